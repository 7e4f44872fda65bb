"""kvtier's tier events through NVIDIA Dynamo 1.6.1's real KV router (from
the ai-dynamo-runtime wheel, on a CPU, no etcd or NATS: file discovery and
the ZMQ event plane), fed by vLLM's real scheduler and ZMQ KV-event
publisher. Dynamo binds the machine's own address, so the whole scenario
(router_scenario.py) runs in a network namespace this test creates, with
only ``lo`` up: nothing leaves 127.0.0.1."""

import json
import shutil
import subprocess
import sys
import pathlib

import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1] / "vllm" / "tests"))


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    import vllm_harness as H

    if shutil.which("unshare") is None:
        pytest.fail("the router test needs unshare(1) (util-linux) to make its network namespace")
    model_dir = H.make_model_dir(tmp_path_factory.mktemp("tiny-llama"))
    cmd = ["unshare", "--net", sys.executable, str(HERE / "router_scenario.py"), "driver", "--netns",
           "--model-dir", model_dir]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    assert p.returncode == 0 and lines, f"scenario failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return json.loads(lines[-1])


def test_the_scenario_ran_on_loopback_only(outcome):
    assert outcome["interfaces"] == ["lo"]


def test_the_router_counts_kvtiers_host_tier(outcome):
    device, host, disk = outcome["after_serve"]["A"]
    assert host >= 3, outcome
    assert outcome["after_serve"]["B"] == [0, 0, 0], "the other worker holds nothing"


def test_a_prefix_the_gpu_evicted_is_still_seen_on_kvtiers_ssd(outcome):
    device, host, disk = outcome["after_gpu_evict"]["A"]
    assert device == 0, outcome
    assert disk >= 3, outcome
    assert outcome["after_gpu_evict"]["B"] == [0, 0, 0]


def test_the_router_picks_the_worker_whose_kvtier_holds_the_prefix(outcome):
    worker_id, _dp, overlap = outcome["best_worker"]
    assert worker_id == outcome["workers"]["A"], outcome
    loads = outcome["potential_prefill_tokens"]
    assert loads["A"] < loads["B"], f"A's tiers cut its prefill: {loads}"


def test_block_removed_takes_the_blocks_out(outcome):
    assert outcome["after_delete"]["A"] == [0, 0, 0]
