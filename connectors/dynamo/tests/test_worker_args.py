"""The command lines of connectors/dynamo/README.md, parsed by NVIDIA Dynamo
1.6.1's own argument parsers, the way `python -m dynamo.vllm` and
`python -m dynamo.frontend` parse them, without starting an engine or a
runtime.

Each command is read out of the README (the fenced block after a
`<!-- dynamo-test: NAME -->` marker), so a documented flag that Dynamo or
vLLM 0.31.0 does not accept, or a README that drifts from what is checked
here, fails these tests. Run in the venv of scripts/dynamo-env.sh, with the
kvtier wheel installed (scripts/python-test.sh does both).
"""

import asyncio
import importlib.metadata
import os
import pathlib
import re
import shlex
import sys
import types

import pytest

# A model id is never looked up on the network: the worker tests point
# --model at an empty local directory, which is all argument parsing reads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

import vllm.platforms  # noqa: E402

# vLLM's CUDA wheel on a host without a GPU cannot infer a device, and its
# argument parser builds default configs that ask for one. Parsing needs no
# device, so such a host parses as a CPU host (Dynamo's frontend does the
# same for its vLLM chat processor). A GPU host keeps its platform.
if vllm.platforms.current_platform.device_type == "":
    from vllm.platforms.cpu import CpuPlatform

    vllm.platforms.current_platform = CpuPlatform()

from dynamo.vllm.args import parse_args_with_model_fetch  # noqa: E402
from dynamo.vllm.constants import DisaggregationMode  # noqa: E402
from dynamo.vllm.kv_connector_protocols import (  # noqa: E402
    NixlConnectorProtocol,
    make_kv_connector_protocol,
)
from vllm.config.kv_transfer import KVTransferConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402

import kvtier.vllm  # noqa: E402

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
DYNAMO_VERSION = "1.6.1"
VLLM_VERSION = "0.31.0"


def documented(name: str) -> list[str]:
    """The argv of the README's command marked `<!-- dynamo-test: NAME -->`."""
    text = README.read_text()
    found = re.findall(rf"<!-- dynamo-test: {re.escape(name)} -->\n```sh\n(.*?)\n```", text, re.S)
    assert len(found) == 1, f"{README} must hold one command marked {name!r}, holds {len(found)}"
    return shlex.split(found[0].replace("\\\n", " "))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """Dynamo's flags also read DYN_* variables; the README's commands alone count."""
    for name in list(os.environ):
        if name.startswith("DYN_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("VLLM_NIXL_SIDE_CHANNEL_HOST", raising=False)


def parse_worker(argv: list[str], model_dir: pathlib.Path):
    """Parses a `python -m dynamo.vllm ...` command as its main() does."""
    assert argv[:3] == ["python", "-m", "dynamo.vllm"], argv[:3]
    args = list(argv[3:])
    args[args.index("--model") + 1] = str(model_dir)
    return asyncio.run(parse_args_with_model_fetch(args))


def assert_kvtier_entry(entry: dict) -> None:
    """A kvtier connector entry that vLLM and kvtier both accept."""
    assert entry["kv_connector"] == "KvTierConnector"
    assert entry["kv_connector_module_path"] == "kvtier.vllm"
    assert entry["kv_load_failure_policy"] == "recompute"
    config = KVTransferConfig(**entry)
    assert KVConnectorFactory.get_connector_class(config) is kvtier.vllm.KvTierConnector
    extra = kvtier.vllm.parse_extra_config(config.kv_connector_extra_config)
    assert extra["mode"] == "daemon"


def assert_events(config, endpoint: str, kvtier_entry: dict) -> None:
    events = config.engine_args.kv_events_config
    assert events is not None, "the worker would publish no KV events"
    assert events.enable_kv_cache_events is True
    assert events.publisher == "zmq"
    assert events.endpoint == endpoint
    # Dynamo relays the events only with prefix caching on (its default).
    assert config.engine_args.enable_prefix_caching is True
    assert config.use_kv_events is True
    # And kvtier's connector turns its tier events on for this config.
    extra = kvtier.vllm.parse_extra_config(kvtier_entry.get("kv_connector_extra_config"))
    engine = types.SimpleNamespace(kv_events_config=events)
    assert kvtier.vllm._events_wanted(engine, extra) is True


def test_the_venv_has_the_supported_versions():
    assert importlib.metadata.version("ai-dynamo") == DYNAMO_VERSION
    assert importlib.metadata.version("ai-dynamo-runtime") == DYNAMO_VERSION
    assert importlib.metadata.version("vllm") == VLLM_VERSION


def test_aggregated_worker_loads_kvtier_and_publishes_events(tmp_path):
    config = parse_worker(documented("worker-aggregated"), tmp_path)
    assert config.disaggregation_mode == DisaggregationMode.AGGREGATED
    assert config.component == "backend"
    kv = config.engine_args.kv_transfer_config
    assert kv is not None
    entry = {
        "kv_connector": kv.kv_connector,
        "kv_connector_module_path": kv.kv_connector_module_path,
        "kv_role": kv.kv_role,
        "kv_load_failure_policy": kv.kv_load_failure_policy,
        "kv_connector_extra_config": kv.kv_connector_extra_config,
    }
    assert_kvtier_entry(entry)
    assert kv.kv_role == "kv_both"
    assert_events(config, "tcp://*:5557", entry)


@pytest.mark.parametrize(
    "name, mode, component, endpoint",
    [
        ("worker-prefill", DisaggregationMode.PREFILL, "prefill", "tcp://*:5557"),
        ("worker-decode", DisaggregationMode.DECODE, "backend", "tcp://*:5558"),
    ],
)
def test_disaggregated_worker_pairs_nixl_with_kvtier(tmp_path, name, mode, component, endpoint):
    config = parse_worker(documented(name), tmp_path)
    assert config.disaggregation_mode == mode
    assert config.component == component
    kv = config.engine_args.kv_transfer_config
    assert kv.kv_connector == "MultiConnector"
    # vLLM's scheduler reads the load-failure policy from the top level.
    assert kv.kv_load_failure_policy == "recompute"
    children = kv.kv_connector_extra_config["connectors"]
    assert [c["kv_connector"] for c in children] == ["NixlConnector", "KvTierConnector"]
    assert_kvtier_entry(children[1])
    # Dynamo hands the prefill/decode exchange to the NIXL child; kvtier
    # rides along.
    protocol = make_kv_connector_protocol(types.SimpleNamespace(kv_transfer_config=kv))
    assert isinstance(protocol, NixlConnectorProtocol)
    # The README tells operators to set the NIXL side-channel host
    # themselves: Dynamo does not for a MultiConnector.
    assert "VLLM_NIXL_SIDE_CHANNEL_HOST" not in os.environ
    assert_events(config, endpoint, children[1])


def test_the_old_connector_flag_is_refused(tmp_path):
    argv = documented("worker-aggregated") + ["--connector", "nixl"]
    with pytest.raises(ValueError, match="--connector is no longer supported"):
        parse_worker(argv, tmp_path)


def test_the_old_connector_variable_is_refused(tmp_path, monkeypatch):
    # The variable is the flag's default, so the flag's message names it.
    monkeypatch.setenv("DYN_CONNECTOR", "kvbm")
    with pytest.raises(ValueError, match="--connector is no longer supported"):
        parse_worker(documented("worker-aggregated"), tmp_path)


def parse_frontend(argv: list[str], monkeypatch):
    """Parses a `python -m dynamo.frontend ...` command as its main() does."""
    from dynamo.frontend.main import parse_args

    assert argv[:3] == ["python", "-m", "dynamo.frontend"], argv[:3]
    monkeypatch.setattr(sys, "argv", ["dynamo.frontend", *argv[3:]])
    config, _, _ = parse_args()
    return config


def test_frontend_routes_by_kv_with_the_tier_weights(monkeypatch):
    config = parse_frontend(documented("frontend"), monkeypatch)
    assert config.router_mode == "kv"
    assert config.use_kv_events is True
    assert config.host_cache_hit_weight == 0.75
    assert config.disk_cache_hit_weight == 0.25
    # The README says these are Dynamo's defaults.
    defaults = parse_frontend(["python", "-m", "dynamo.frontend"], monkeypatch)
    assert defaults.host_cache_hit_weight == config.host_cache_hit_weight
    assert defaults.disk_cache_hit_weight == config.disk_cache_hit_weight
    assert defaults.router_mode != "kv", "the README says --router-mode kv is needed"
