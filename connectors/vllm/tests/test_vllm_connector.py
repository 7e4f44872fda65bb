"""KvTierConnector against vLLM 0.33.0's real v1 Scheduler on CPU (the
harness in vllm_harness.py plays the model runner with CPU KV tensors)."""

import glob
import time

import pytest
import torch

import kvtier
import kvtier.vllm as kv
import vllm_harness as H

CONNECTOR = ("KvTierConnector", "kvtier.vllm")
PREFIX = list(range(10, 58))  # 48 tokens: 3 full blocks


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return H.make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


def instance(model_dir, extra, **kw):
    vc = H.make_vllm_config(model_dir, *CONNECTOR, extra, **kw)
    kcc = H.make_kv_cache_config(vc)
    sched = H.make_scheduler(vc, kcc)
    worker = H.make_worker(vc, kcc)
    return vc, sched, worker


def scheduled(res, req_id):
    """(num_computed_tokens, block_ids) of `req_id` if this step scheduled it."""
    so = res.scheduler_output
    if req_id not in so.num_scheduled_tokens:
        return None
    for new in so.scheduled_new_reqs:
        if new.req_id == req_id:
            return new.num_computed_tokens, new.block_ids[0]
    c = so.scheduled_cached_reqs
    i = c.req_ids.index(req_id)
    return c.num_computed_tokens[i], None


def step_until_scheduled(sched, worker, req_id, deadline_s=10.0):
    """Steps (an async load makes the request wait) until `req_id` runs."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        res = H.step(sched, worker)
        got = scheduled(res, req_id)
        if got is not None:
            return res, got
        time.sleep(0.001)
    raise AssertionError(f"{req_id} was not scheduled within {deadline_s} s")


def save_prefix(model_dir, extra, req_id="r1", **kw):
    _, sched, worker = instance(model_dir, extra, **kw)
    sched.add_request(H.make_request(req_id, PREFIX + [100, 101], max_tokens=2))
    H.run_until_finished(sched, worker, [req_id], max_steps=10)
    return worker


@pytest.mark.parametrize("load_mode", ["async", "sync"])
def test_a_saved_prefix_is_matched_and_loaded_byte_for_byte(model_dir, tmp_path, load_mode):
    extra = {"mode": "embedded", "host_capacity_bytes": 64 << 20, "salt": str(tmp_path), "load_mode": load_mode}
    save_prefix(model_dir, extra)
    # A fresh engine instance (empty GPU cache) sharing the store.
    _, sched, worker = instance(model_dir, extra)
    p2 = PREFIX + [200, 201, 202]
    sched.add_request(H.make_request("r2", p2, max_tokens=2))
    first = H.step(sched, worker)
    if load_mode == "async":
        # The request waits for its blocks; the scheduler is not held up.
        assert "r2" not in first.scheduler_output.num_scheduled_tokens
        res, (computed, block_ids) = step_until_scheduled(sched, worker, "r2")
    else:
        res, (computed, block_ids) = first, scheduled(first, "r2")
    assert computed == 48, "the saved 3-block prefix was not matched"
    assert res.scheduler_output.num_scheduled_tokens == {"r2": len(p2) - 48}
    assert not any(r.kv_connector_output.invalid_block_ids for r in worker.history if r.kv_connector_output)
    for i, name in enumerate(worker.layer_names):
        got = H.read_kv(worker.kv_caches[name], block_ids, 48)
        assert torch.equal(got, H.expected_kv(i, PREFIX, range(48), 2, 64)), name
    H.run_until_finished(sched, worker, ["r2"], max_steps=5)


def test_never_the_last_prompt_token(model_dir, tmp_path):
    extra = {"host_capacity_bytes": 64 << 20, "salt": str(tmp_path), "load_mode": "sync"}
    save_prefix(model_dir, extra)
    _, sched, worker = instance(model_dir, extra)
    # The prompt is exactly the 48 saved tokens: the last block is computed.
    sched.add_request(H.make_request("r3", PREFIX, max_tokens=2))
    res = H.step(sched, worker)
    (new,) = res.scheduler_output.scheduled_new_reqs
    assert new.num_computed_tokens == 32
    assert res.scheduler_output.num_scheduled_tokens == {"r3": 16}


def test_another_model_never_matches(model_dir, tmp_path_factory, tmp_path):
    extra = {"host_capacity_bytes": 64 << 20, "salt": str(tmp_path)}
    save_prefix(model_dir, extra)
    other_model = H.make_model_dir(tmp_path_factory.mktemp("other-model"))
    _, sched, worker = instance(other_model, extra)
    sched.add_request(H.make_request("r4", PREFIX + [1, 2, 3], max_tokens=2))
    res = H.step(sched, worker)
    assert res.scheduler_output.scheduled_new_reqs[0].num_computed_tokens == 0
    # Nor another salt, on the same model.
    _, sched, worker = instance(model_dir, dict(extra, salt="tenant-b"))
    sched.add_request(H.make_request("r5", PREFIX + [1, 2, 3], max_tokens=2))
    assert H.step(sched, worker).scheduler_output.scheduled_new_reqs[0].num_computed_tokens == 0


def test_a_corrupt_block_is_reported_and_recomputed(model_dir, tmp_path):
    store = {"mode": "ssd-only", "disk": {"dir": str(tmp_path / "ssd"), "capacity_bytes": 64 << 20, "segment_bytes": 8 << 20}}
    extra = {"store": store}  # async loads: the default
    save_prefix(model_dir, extra)
    # Flip bytes inside the first record's data on the SSD, behind kvtier's back.
    (seg,) = glob.glob(str(tmp_path / "ssd" / "*.seg"))
    with open(seg, "r+b") as f:
        f.seek(8192 + 100)
        b = f.read(1)
        f.seek(8192 + 100)
        f.write(bytes([b[0] ^ 0xFF]))
    _, sched, worker = instance(model_dir, extra, kv_load_failure_policy="recompute")
    p2 = PREFIX + [7, 8]
    sched.add_request(H.make_request("r6", p2, max_tokens=2))
    H.step(sched, worker)
    # The load finishes with the corrupt block reported, in the same pass.
    end = time.monotonic() + 10
    bad = set()
    while not bad and time.monotonic() < end:
        bad = {b for r in worker.history if r.kv_connector_output for b in r.kv_connector_output.invalid_block_ids}
        if not bad:
            H.step(sched, worker)
            time.sleep(0.001)
    assert bad, "a corrupt block was served as a success"
    # vLLM recomputes: the request still finishes, and the bad block is never
    # what the model reads (the worker's KV for it is the recomputed one).
    H.run_until_finished(sched, worker, ["r6"], max_steps=10)
    assert not sched.has_requests()


def test_bad_extra_config_names_the_key(model_dir):
    with pytest.raises(ValueError, match="unknown key 'host_capacity'"):
        instance(model_dir, {"host_capacity": 1})
    with pytest.raises(ValueError, match="mode 'remote'"):
        instance(model_dir, {"mode": "remote"})


def test_unknown_block_hashes_are_refused_and_a_failing_policy_is_flagged(model_dir, monkeypatch, caplog):
    """At startup: a prefix-caching hash kvtier does not know how to key is
    refused (never keyed some other way), and kv_load_failure_policy 'fail'
    (vLLM's default) is flagged, since a kvtier miss would fail requests."""
    vc = H.make_vllm_config(model_dir, *CONNECTOR, {})
    monkeypatch.setattr(vc.cache_config, "prefix_caching_hash_algo", "md5", raising=False)
    with pytest.raises(ValueError, match="prefix_caching_hash_algo 'md5'"):
        kv.check_hashing(vc)
    with pytest.raises(TypeError, match=r"hashes\[1\]"):
        kv.request_keys(bytes(16), [b"x" * 32, 12345])
    caplog.clear()
    instance(model_dir, {}, kv_load_failure_policy="fail")
    assert any("kv_load_failure_policy is 'fail'" in r.getMessage() for r in caplog.records)
    caplog.clear()
    instance(model_dir, {}, kv_load_failure_policy="recompute")
    assert not any("kv_load_failure_policy" in r.getMessage() for r in caplog.records)


def test_an_unknown_layout_is_refused_at_registration(model_dir, tmp_path):
    vc = H.make_vllm_config(model_dir, *CONNECTOR, {"salt": str(tmp_path)})
    kcc = H.make_kv_cache_config(vc)
    caches = H.make_kv_caches(vc, kcc)
    wrong = {n: torch.zeros(4, 2, 8, 128, dtype=torch.float16) for n in caches}
    with pytest.raises(ValueError, match="layout .* is not understood"):
        H.make_worker_connector(vc, wrong, kcc)


def test_a_daemon_that_is_down_means_misses_not_a_crash(model_dir, caplog):
    extra = {"mode": "daemon", "endpoint": "http://127.0.0.1:1"}
    _, sched, worker = instance(model_dir, extra)
    sched.add_request(H.make_request("r7", PREFIX + [1], max_tokens=2))
    results = H.run_until_finished(sched, worker, ["r7"], max_steps=10)
    assert results[0].scheduler_output.scheduled_new_reqs[0].num_computed_tokens == 0
    assert not sched.has_requests()
    assert any("unavailable" in r.getMessage() for r in caplog.records)


def test_daemon_mode_shares_blocks_across_engines(model_dir, kvtierd):
    extra = {"mode": "daemon", "endpoint": kvtierd.endpoint}
    save_prefix(model_dir, extra)
    _, sched, worker = instance(model_dir, extra)
    sched.add_request(H.make_request("r8", PREFIX + [5, 6], max_tokens=2))
    _, (computed, block_ids) = step_until_scheduled(sched, worker, "r8")
    assert computed == 48
    for i, name in enumerate(worker.layer_names):
        got = H.read_kv(worker.kv_caches[name], block_ids, 48)
        assert torch.equal(got, H.expected_kv(i, PREFIX, range(48), 2, 64)), name


def test_blocks_move_between_kv_memory_layouts(model_dir, tmp_path):
    """Blocks are stored token-major whatever the engine's memory order: a
    prefix saved by an engine with vLLM's default layout (the direct Rust
    copy path) loads byte for byte into one using HND (the permuting path)."""
    extra = {"host_capacity_bytes": 64 << 20, "salt": str(tmp_path), "load_mode": "sync"}
    saver = save_prefix(model_dir, extra)
    assert saver.connector._direct, "the default layout should take the direct copy path"
    _, sched, worker = instance(model_dir, extra, kv_cache_layout="HND")
    assert not worker.connector._direct
    sched.add_request(H.make_request("r9", PREFIX + [3, 4], max_tokens=2))
    res = H.step(sched, worker)
    computed, block_ids = scheduled(res, "r9")
    assert computed == 48
    for i, name in enumerate(worker.layer_names):
        got = H.read_kv(worker.kv_caches[name], block_ids, 48)
        assert torch.equal(got, H.expected_kv(i, PREFIX, range(48), 2, 64)), name


def test_the_installed_wheel_ships_the_connector():
    """kvtier.vllm is imported from the installed wheel (not this checkout)
    and is, byte for byte, the source in connectors/vllm."""
    import pathlib

    source = pathlib.Path(__file__).resolve().parents[1] / "kvtier" / "vllm.py"
    installed = pathlib.Path(kv.__file__).resolve()
    assert installed != source and "site-packages" in installed.parts, installed
    assert installed.parent == pathlib.Path(kvtier.__file__).resolve().parent
    assert installed.read_bytes() == source.read_bytes(), f"{installed} is not {source}: rebuild the wheel"


def test_the_documented_flag_loads_the_connector(model_dir):
    """The exact --kv-transfer-config JSON of the README, through vLLM's own
    KVTransferConfig and KVConnectorFactory."""
    import json

    from vllm.config import KVTransferConfig

    flag = (
        '{"kv_connector":"KvTierConnector","kv_connector_module_path":"kvtier.vllm",'
        '"kv_role":"kv_both","kv_connector_extra_config":{"mode":"embedded","host_capacity_bytes":67108864}}'
    )
    ktc = KVTransferConfig(**json.loads(flag))
    vc = H.make_vllm_config(model_dir, ktc.kv_connector, ktc.kv_connector_module_path, ktc.kv_connector_extra_config)
    conn = H.make_worker_connector(vc)
    assert type(conn).__name__ == "KvTierConnector" and type(conn).__module__ == "kvtier.vllm"


def test_a_daemon_restart_under_the_engine(model_dir, tmp_path, caplog):
    """Down: misses and a warning, the engine keeps serving. Back (same
    port, same data): hits again, with nothing re-registered by hand."""
    import socket

    from conftest import Daemon

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"KVTIER_LISTEN": f"127.0.0.1:{port}"}
    d = Daemon(tmp_path / "data", env)
    extra = {"mode": "daemon", "endpoint": d.endpoint, "load_mode": "sync"}
    try:
        save_prefix(model_dir, extra)
        _, sched, worker = instance(model_dir, extra)
        d.stop()
        sched.add_request(H.make_request("down", PREFIX + [1, 2], max_tokens=2))
        res = H.step(sched, worker)
        assert scheduled(res, "down")[0] == 0
        H.run_until_finished(sched, worker, ["down"], max_steps=10)
        assert any("unavailable" in r.getMessage() or "failed" in r.getMessage() for r in caplog.records)
        d = Daemon(tmp_path / "data", env)
        end = time.monotonic() + 10
        while True:
            sched.add_request(H.make_request(f"up-{time.monotonic()}", PREFIX + [3, 4], max_tokens=2))
            res = H.step(sched, worker)
            (new,) = res.scheduler_output.scheduled_new_reqs
            if new.num_computed_tokens == 48:
                break
            assert time.monotonic() < end, "the connector did not reconnect to the restarted daemon"
            H.run_until_finished(sched, worker, [new.req_id], max_steps=10)
            time.sleep(0.2)
        for i, name in enumerate(worker.layer_names):
            got = H.read_kv(worker.kv_caches[name], new.block_ids[0], 48)
            assert torch.equal(got, H.expected_kv(i, PREFIX, range(48), 2, 64)), name
    finally:
        d.stop()


class FakeClient:
    """Stands in for kvtier.Client where a real daemon cannot be made to
    answer one chosen error kind on one chosen call (throttling needs a full
    queue at the right moment). `fail` is the exception its next data calls
    raise, or None."""

    made = 0
    fail = None

    def __init__(self, endpoint, token=None, timeout_s=None):
        FakeClient.made += 1

    def register_namespace(self, namespace):
        return bytes(16)

    def _call(self):
        if FakeClient.fail is not None:
            raise FakeClient.fail("fake daemon: " + FakeClient.fail.__name__)

    def lookup(self, ns, keys):
        self._call()
        return 0, []

    def put(self, ns, keys, data):
        self._call()
        return {"stored": len(keys)}


@pytest.fixture
def fake_client(monkeypatch):
    monkeypatch.setattr(FakeClient, "made", 0)
    monkeypatch.setattr(FakeClient, "fail", None)
    monkeypatch.setattr(kv.kvtier, "Client", FakeClient)
    return FakeClient


def test_fake_client_throttled_keeps_the_daemon_client_unavailable_drops_it(fake_client):
    d = kv._Daemon("http://fake", None, retry_s=0.2)
    ns = d.register_namespace({})
    client = d._client
    assert fake_client.made == 1
    fake_client.fail = kvtier.ThrottledError
    for _ in range(3):
        with pytest.raises(kvtier.ThrottledError):
            d.lookup(ns, [bytes(16)])
    assert d._client is client, "a throttled daemon is up: the client must be kept"
    assert fake_client.made == 1, "a throttled call reconnected"
    fake_client.fail = kvtier.UnavailableError
    with pytest.raises(kvtier.UnavailableError):
        d.lookup(ns, [bytes(16)])
    assert d._client is None, "an unavailable daemon drops the client"
    fake_client.fail = None
    # Until retry_s has passed, calls fail at once without reconnecting (a
    # wedged daemon would hold each of them for its whole timeout).
    with pytest.raises(kvtier.UnavailableError):
        d.lookup(ns, [bytes(16)])
    assert fake_client.made == 1
    time.sleep(0.25)
    assert d.lookup(ns, [bytes(16)]) == (0, [])
    assert fake_client.made == 2, "the next call after retry_s reconnects"


def test_fake_client_a_throttled_daemon_means_misses_and_skipped_saves(model_dir, fake_client, caplog):
    """Through vLLM's real scheduler: every lookup and save of a request is
    throttled; the request is served from scratch and no connector
    reconnects."""
    fake_client.fail = kvtier.ThrottledError
    _, sched, worker = instance(model_dir, {"mode": "daemon", "endpoint": "http://fake"})
    made = fake_client.made  # one client each: scheduler and worker connectors
    assert made == 2
    sched.add_request(H.make_request("t1", PREFIX + [1], max_tokens=2))
    results = H.run_until_finished(sched, worker, ["t1"], max_steps=10)
    assert results[0].scheduler_output.scheduled_new_reqs[0].num_computed_tokens == 0
    assert not sched.has_requests()
    assert fake_client.made == made, "a throttled daemon made a connector reconnect"
    messages = [r.getMessage() for r in caplog.records]
    assert any("lookup failed" in m and "ThrottledError" in m for m in messages), messages
    assert any("skipped" in m and "ThrottledError" in m for m in messages), messages


def test_a_throttled_daemon_keeps_the_connectors_client(model_dir, tmp_path, monkeypatch, caplog):
    """A real kvtierd whose write-through queue holds 2 blocks refuses a save
    of 3 new blocks as throttled (ThrottledError, not UnavailableError): the
    save is skipped, the request is served, and neither connector reconnects;
    the same client answers the next lookup."""
    from kvtier_testkit import throttled_daemon

    daemon = throttled_daemon(tmp_path, 2)
    made = []
    real = kvtier.Client

    def counting_client(*a, **k):
        made.append(a)
        return real(*a, **k)

    monkeypatch.setattr(kv.kvtier, "Client", counting_client)
    try:
        extra = {"mode": "daemon", "endpoint": daemon.endpoint}
        _, sched, worker = instance(model_dir, extra)
        clients = len(made)
        sched.add_request(H.make_request("q1", PREFIX + [1], max_tokens=2))
        H.run_until_finished(sched, worker, ["q1"], max_steps=10)
        messages = [r.getMessage() for r in caplog.records]
        # The daemon's error kind, as the connector logged it.
        assert any("skipped" in m and "throttled:" in m for m in messages), messages
        assert not any("unavailable" in m.lower() for m in messages), messages
        # Nothing was stored, and the same clients still answer.
        sched.add_request(H.make_request("q2", PREFIX + [2], max_tokens=2))
        H.run_until_finished(sched, worker, ["q2"], max_steps=10)
        assert real(daemon.endpoint).stats()["stored_blocks"] == 0
        stats = worker.connector.save_stats
        assert stats.skipped_store == 2 * 3 and stats.saved == 0, stats
        assert len(made) == clients, f"a throttled daemon made a connector reconnect: {made}"
    finally:
        daemon.stop()


def test_a_stalled_daemon_never_blocks_the_step(model_dir, tmp_path):
    """Saves run off the step: with the daemon frozen (SIGSTOP) every put
    hangs, yet the engine serves request after request; once the staging
    (2 slots here) is all in flight, further saves are skipped and counted.
    Thawed, what was copied out is stored and found by a fresh engine."""
    from conftest import Daemon

    d = Daemon(tmp_path / "data")
    # Lookups give up on the frozen daemon after 0.2 s (misses); the
    # saver's puts wait for it (transfer_timeout_s).
    extra = {"mode": "daemon", "endpoint": d.endpoint, "staging_bytes": 1, "load_mode": "sync", "timeout_s": 0.2}
    try:
        _, sched, worker = instance(model_dir, extra)
        # Registered while the daemon answers; then it freezes.
        sched.add_request(H.make_request("warm", [7] * 20, max_tokens=1))
        H.run_until_finished(sched, worker, ["warm"], max_steps=10)
        base = worker.connector.save_stats.saved
        d.freeze()
        try:
            prefixes = [[1000 * (i + 1) + t for t in range(48)] for i in range(4)]
            for i, p in enumerate(prefixes):
                sched.add_request(H.make_request(f"s{i}", p + [1], max_tokens=2))
            steps = 0
            while sched.has_requests():
                H.step(sched, worker)
                steps += 1
                assert steps < 40, "the engine stalled behind a frozen daemon"
            stats = worker.connector.save_stats
            assert stats.skipped_in_flight == 3 * 2, stats  # two saves held, two skipped
            assert stats.saved == base, stats
        finally:
            d.thaw()
        worker.connector.flush_saves()
        assert worker.connector.save_stats.saved == base + 3 * 2
        # A fresh engine finds the first two prefixes (held, then stored),
        # not the two skipped ones.
        _, sched2, worker2 = instance(model_dir, extra)
        found = []
        for i, p in enumerate(prefixes):
            sched2.add_request(H.make_request(f"f{i}", p + [2], max_tokens=1))
            found.append(scheduled(H.step(sched2, worker2), f"f{i}")[0])
            H.run_until_finished(sched2, worker2, [], max_steps=10)  # drained
        assert sorted(found) == [0, 0, 48, 48], found
    finally:
        d.stop()


def test_a_preempted_and_resumed_request_saves_and_loads_only_its_own_kv(model_dir, tmp_path):
    """A KV cache too small for both requests: vLLM preempts one (its blocks
    freed and reused by the other) and resumes it later (0.34: whole, in
    scheduled_new_reqs; older: in scheduled_cached_reqs). Every block kvtier
    saved is that request's own KV: a fresh engine loads each prompt back
    byte for byte."""
    extra = {"mode": "embedded", "host_capacity_bytes": 64 << 20, "salt": str(tmp_path), "load_mode": "sync"}
    _, sched, worker = instance(model_dir, extra, num_gpu_blocks=12, max_num_batched_tokens=32, max_model_len=160)
    prompts = {f"p{i}": [3000 + 100 * i + t for t in range(64)] for i in range(2)}
    reqs = [H.make_request(r, p, max_tokens=60) for r, p in prompts.items()]
    H.add_requests(sched, *reqs)
    H.run_until_finished(sched, worker, list(prompts), max_steps=400)
    assert sum(r.num_preemptions for r in reqs) > 0, "the test did not make vLLM preempt"
    # Each prompt's 3 blocks that precede its last token were saved (the
    # 4th holds the last prompt token vLLM must compute itself).
    _, sched2, worker2 = instance(model_dir, extra)
    for rid, p in prompts.items():
        sched2.add_request(H.make_request(f"{rid}-again", p + [1], max_tokens=1))
        res = H.step(sched2, worker2)
        computed, block_ids = scheduled(res, f"{rid}-again")
        assert computed == 64, (rid, computed)
        for i, name in enumerate(worker2.layer_names):
            got = H.read_kv(worker2.kv_caches[name], block_ids, 64)
            assert torch.equal(got, H.expected_kv(i, p, range(64), 2, 64)), (rid, name)
        H.run_until_finished(sched2, worker2, [], max_steps=10)
    assert not any(
        r.kv_connector_output.invalid_block_ids for r in worker2.history if r.kv_connector_output
    ), "a load failed"
