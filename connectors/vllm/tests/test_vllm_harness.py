"""The vLLM harness works: vLLM 0.33.0's real v1 Scheduler on CPU, connectors
loaded by module path, worker-side connector fed CPU KV tensors.

Proved with vLLM's own ExampleConnector (safetensors files in a directory)
and with the harness's RecordingConnector (async loads, load errors).
"""

import os

import pytest

import vllm  # noqa: F401  (the real package: a missing one is a failure, not a skip)

import torch  # noqa: E402

import vllm_harness as H  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput  # noqa: E402
from vllm.v1.request import RequestStatus  # noqa: E402

EXAMPLE = ("ExampleConnector", "vllm.distributed.kv_transfer.kv_connector.v1.example_connector")
RECORDING = ("RecordingConnector", "vllm_harness")
BLOCK = 16
PREFIX = list(range(10, 58))  # 48 tokens = 3 full blocks, shared by both prompts


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return H.make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


def make_instance(model_dir, name, module, extra, runner="v2", worker=True, **kw):
    vc = H.make_vllm_config(model_dir, name, module, extra, **kw)
    kcc = H.make_kv_cache_config(vc)
    sched = H.make_scheduler(vc, kcc)
    w = H.make_worker(vc, kcc, runner=runner) if worker else None
    return vc, kcc, sched, w


def test_config_layout_and_block_hashes(model_dir):
    vc, kcc, sched, worker = make_instance(model_dir, *EXAMPLE, {"shared_storage_path": "/nonexistent"})
    assert vc.cache_config.kv_cache_layout == "LBNHC"
    assert vc.cache_config.num_gpu_blocks == kcc.num_blocks == 128
    assert vc.scheduler_config.disable_hybrid_kv_cache_manager  # ExampleConnector has no HMA
    (group,) = kcc.kv_cache_groups
    assert group.layer_names == ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]
    assert type(sched.connector).__name__ == "ExampleConnector"
    assert sched.connector.role.name == "SCHEDULER" and worker.connector.role.name == "WORKER"

    # [num_blocks, num_kv_heads, block_size, 2 * head_size], LBNHC strides.
    for t in worker.kv_caches.values():
        assert t.shape == (128, 2, BLOCK, 128) and t.dtype == torch.float16
        assert t.stride() == (BLOCK * 2 * 128, 128, 2 * 128, 1)
        assert not t.is_contiguous()
    a, b = worker.kv_caches.values()
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # one allocation

    req = H.make_request("r", PREFIX + [1, 2, 3, 4, 5], max_tokens=2)
    assert len(req.block_hashes) == 3  # only full blocks
    assert all(isinstance(h, bytes) and len(h) == 32 for h in req.block_hashes)
    assert req.block_hashes == H.chain_block_hashes(PREFIX)
    other = H.make_request("o", PREFIX[:32] + [9] * 16)
    assert other.block_hashes[:2] == req.block_hashes[:2] and other.block_hashes[2] != req.block_hashes[2]


def test_example_connector_external_hit_across_instances(model_dir, tmp_path):
    """Instance A runs r1 and saves its KV with ExampleConnector; instance B
    (fresh GPU cache, same storage dir) gets r2 with the same 48-token prefix:
    the scheduler asks the connector, gets 48 external tokens, schedules only
    the rest, and the worker connector injects A's KV into B's blocks."""
    extra = {"shared_storage_path": str(tmp_path / "kv")}
    os.makedirs(extra["shared_storage_path"])
    _, kcc_a, sched_a, worker_a = make_instance(model_dir, *EXAMPLE, extra)
    p1 = PREFIX + [100, 101]
    sched_a.add_request(H.make_request("r1", p1, max_tokens=3))
    results = H.run_until_finished(sched_a, worker_a, ["r1"], max_steps=10)
    first = results[0].scheduler_output
    assert first.num_scheduled_tokens == {"r1": len(p1)}  # whole prompt, no hit
    assert first.scheduled_new_reqs[0].num_computed_tokens == 0
    assert [r.model_runner_output.sampled_token_ids for r in results] == [[[7]], [[7]], [[7]], []]
    assert results[2].finished == {"r1"}
    # The drain step tells the worker (get_transfer_results) that r1 is gone.
    assert results[3].scheduler_output.finished_req_ids == {"r1"}
    assert not sched_a.has_requests()
    saved = os.listdir(extra["shared_storage_path"])
    assert len(saved) == 1  # one prompt folder, one file per layer
    assert sorted(os.listdir(os.path.join(extra["shared_storage_path"], saved[0]))) == [
        "model.layers.0.self_attn.attn.safetensors",
        "model.layers.1.self_attn.attn.safetensors",
    ]

    _, _, sched_b, worker_b = make_instance(model_dir, *EXAMPLE, extra)
    p2 = PREFIX + [200, 201, 202]
    r2 = H.make_request("r2", p2, max_tokens=2)
    sched_b.add_request(r2)
    res = H.step(sched_b, worker_b)
    so = res.scheduler_output
    (new,) = so.scheduled_new_reqs
    assert new.num_computed_tokens == 48  # the external hit
    assert so.num_scheduled_tokens == {"r2": len(p2) - 48}
    assert so.has_sync_kv_loads  # ExampleConnector loads synchronously
    assert worker_b.history[-1].load_started_before_forward
    stats = res.scheduler_stats.connector_prefix_cache_stats
    assert (stats.queries, stats.hits) == (len(p2), 48)
    assert res.model_runner_output.sampled_token_ids == [[7]]

    # The KV in B's first three blocks is what A's forward wrote for the prefix.
    for i, name in enumerate(worker_b.layer_names):
        got = H.read_kv(worker_b.kv_caches[name], new.block_ids[0], 48)
        want = H.expected_kv(i, PREFIX, range(48), 2, 64)
        assert torch.equal(got, want), name
    # ...and the suffix is B's own forward, not A's tokens.
    got = H.read_kv(worker_b.kv_caches[worker_b.layer_names[0]], new.block_ids[0], len(p2))[48:]
    assert torch.equal(got, H.expected_kv(0, p2[48:], range(48, len(p2)), 2, 64))

    H.run_until_finished(sched_b, worker_b, ["r2"], max_steps=5)
    assert not sched_b.has_requests()


def test_local_prefix_hit_is_offered_to_connector_first(model_dir, tmp_path):
    """Same instance: the local prefix cache serves r2's 48 tokens, the
    connector is asked with num_computed_tokens=48 and adds nothing; after
    reset_prefix_cache() the connector supplies them instead."""
    extra = {"shared_storage_path": str(tmp_path)}
    _, _, sched, worker = make_instance(model_dir, *EXAMPLE, extra)
    asked = []
    real = sched.connector.get_num_new_matched_tokens

    def spy(request, num_computed_tokens):
        out = real(request, num_computed_tokens)
        asked.append((request.request_id, num_computed_tokens, out))
        return out

    sched.connector.get_num_new_matched_tokens = spy
    sched.add_request(H.make_request("r1", PREFIX + [100, 101], max_tokens=1))
    H.run_until_finished(sched, worker, max_steps=5)
    assert asked == [("r1", 0, (0, False))]

    sched.add_request(H.make_request("r2", PREFIX + [200, 201, 202], max_tokens=1))
    so = H.step(sched, worker).scheduler_output
    assert asked[-1] == ("r2", 48, (0, False))  # block-aligned local hit
    assert so.scheduled_new_reqs[0].num_computed_tokens == 48 and not so.has_sync_kv_loads
    H.run_until_finished(sched, worker, max_steps=5)

    assert sched.reset_prefix_cache()
    sched.add_request(H.make_request("r3", PREFIX + [300, 301, 302], max_tokens=1))
    so = H.step(sched, worker).scheduler_output
    assert asked[-1] == ("r3", 0, (48, False))
    assert so.scheduled_new_reqs[0].num_computed_tokens == 48 and so.has_sync_kv_loads
    H.run_until_finished(sched, worker, max_steps=5)


@pytest.mark.parametrize("runner", ["v2", "v1"])
def test_async_load_through_worker_connector(model_dir, runner):
    """An async hit: the request waits in WAITING_FOR_REMOTE_KVS while the
    worker connector's get_finished() holds it back, and is scheduled from
    the loaded prefix once finished_recving reports it."""
    extra = {"matched_tokens": 32, "async": True, "load_steps": 2}
    _, _, sched, worker = make_instance(model_dir, *RECORDING, extra, runner=runner)
    wc = worker.connector
    assert wc.names() == ["register_kv_caches"]
    prompt = PREFIX + [100, 101]
    req = H.make_request("a", prompt, max_tokens=2)
    sched.add_request(req)

    res = H.step(sched, worker)
    assert res.scheduler_output.num_scheduled_tokens == {}
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS
    assert sched.connector.calls[0] == ("get_num_new_matched_tokens", ("a", 0, 32))
    (_, (_, blocks, n_ext)) = sched.connector.calls[1]
    assert n_ext == 32 and len(blocks) == 2  # only the blocks being loaded, for now
    assert res.scheduler_output.kv_connector_metadata.loads == {"a": blocks}
    # No forward this step: no layer calls, a context without attn metadata.
    assert wc.names()[1:] == ["start_load_kv", "wait_for_save", "get_finished"]
    assert wc.calls[1] == ("start_load_kv", ({"a": blocks}, False))
    assert res.model_runner_output.kv_connector_output is None  # nothing to report

    res = H.step(sched, worker)  # load still in flight, then reported done
    assert res.scheduler_output.num_scheduled_tokens == {}
    assert res.model_runner_output.kv_connector_output.finished_recving == {"a"}
    assert req.status == RequestStatus.WAITING_FOR_REMOTE_KVS

    res = H.step(sched, worker)
    so = res.scheduler_output
    assert so.num_scheduled_tokens == {"a": len(prompt) - 32}
    assert so.scheduled_new_reqs[0].num_computed_tokens == 32
    assert so.scheduled_new_reqs[0].block_ids[0][:2] == blocks
    assert not so.has_sync_kv_loads
    names = wc.names()
    step3 = names[names.index("get_finished") + 1 :]
    step3 = step3[step3.index("get_finished") + 1 :]
    layer_calls = ["wait_for_layer_load", "save_kv_layer"] * 2
    assert step3 == layer_calls + ["start_load_kv", "wait_for_save", "get_finished"]
    if runner == "v2":  # async loads are submitted outside the forward context
        assert wc.calls[-3] == ("start_load_kv", ({}, False))
    else:
        assert wc.calls[-3] == ("start_load_kv", ({}, True))
    H.run_until_finished(sched, worker, ["a"], max_steps=5)
    assert req.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_scheduler_only_injected_finished_recving(model_dir):
    """Without a worker: the test plays the worker and injects finished_recving."""
    extra = {"matched_tokens": 48, "async": True}
    _, _, sched, _ = make_instance(model_dir, *RECORDING, extra, worker=False)
    req = H.make_request("s", PREFIX + [100], max_tokens=1)  # 49 tokens: 48 loadable
    sched.add_request(req)
    assert H.step(sched).scheduler_output.num_scheduled_tokens == {}
    assert H.step(sched).scheduler_output.num_scheduled_tokens == {}  # nobody said done
    res = H.step(sched, kv_connector_output=KVConnectorOutput(finished_recving={"s"}))
    assert res.scheduler_output.num_scheduled_tokens == {}  # promoted on the next schedule()
    res = H.step(sched)
    assert res.scheduler_output.num_scheduled_tokens == {"s": 1}
    assert res.finished == {"s"}


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_invalid_block_ids_injected_by_hook(model_dir, policy):
    """A sync load whose first block failed: with 'recompute' the scheduler
    rewinds the request to token 0 and recomputes; with 'fail' it errors."""
    extra = {"matched_tokens": 32}
    _, _, sched, worker = make_instance(model_dir, *RECORDING, extra, kv_load_failure_policy=policy)
    prompt = PREFIX + [100, 101]
    req = H.make_request("f", prompt, max_tokens=2)
    sched.add_request(req)

    def fail_first_loaded_block(so, kv_out):
        loads = so.kv_connector_metadata.loads
        if not loads:
            return kv_out
        bad = {loads["f"][0]}
        return H.merge_kv_connector_outputs(kv_out, KVConnectorOutput(invalid_block_ids=bad))

    res = H.step(sched, worker, kv_output_hook=fail_first_loaded_block)
    assert res.scheduler_output.has_sync_kv_loads
    assert res.scheduler_output.num_scheduled_tokens == {"f": len(prompt) - 32}
    if policy == "fail":
        assert res.finished == {"f"} and req.status == RequestStatus.FINISHED_ERROR
        return
    assert req.num_computed_tokens == 0 and not res.finished
    res = H.step(sched, worker)
    cached = res.scheduler_output.scheduled_cached_reqs
    assert cached.req_ids == ["f"] and cached.num_computed_tokens == [0]
    assert res.scheduler_output.num_scheduled_tokens == {"f": len(prompt)}
    H.run_until_finished(sched, worker, ["f"], max_steps=5)
    assert req.status == RequestStatus.FINISHED_LENGTH_CAPPED


def test_chunked_prefill_samples_only_at_prompt_end(model_dir):
    _, _, sched, worker = make_instance(
        model_dir, *RECORDING, {}, max_num_batched_tokens=32, max_model_len=256
    )
    prompt = list(range(4, 74))  # 70 tokens: 32 + 32 + 6
    sched.add_request(H.make_request("c", prompt, max_tokens=2))
    results = H.run_until_finished(sched, worker, max_steps=10)
    assert [r.scheduler_output.num_scheduled_tokens.get("c") for r in results] == [32, 32, 6, 1, None]
    assert [r.model_runner_output.sampled_token_ids for r in results] == [[[]], [[]], [[7]], [[7]], []]
    saves = [c for c in worker.connector.calls if c[0] == "save_kv_layer"]
    assert [s[1][2] for s in saves[::2]] == [32, 32, 6, 1]  # attn_metadata.num_actual_tokens
