"""Drive vLLM's real v1 scheduler on CPU with a KV connector loaded by module path.

Written against vLLM 0.33.0. No model is run: each step calls the real
``Scheduler.schedule()``, plays the worker's part with a fake forward pass
(the worker-side connector, when given, sees the same calls in the same order
as under vLLM's model runner, on CPU tensors), fabricates the
``ModelRunnerOutput`` (one sampled token per request that finished its
prefill, the worker connector's ``KVConnectorOutput``) and hands it to the
real ``Scheduler.update_from_output()``.

API (see each docstring):

* ``make_model_dir(tmp_path)``: a tiny random Llama config and a local
  WordLevel tokenizer, saved; nothing is downloaded.
* ``make_vllm_config(model_dir, connector_name, module_path, extra_config)``
* ``make_kv_cache_config(vllm_config)``: vLLM's own planner, one group.
* ``make_scheduler(vllm_config)``: the real ``Scheduler``; its scheduler-side
  connector is ``scheduler.connector``.
* ``make_request(request_id, prompt_token_ids, max_tokens, block_size)``:
  ``Request`` with vLLM's block hasher, so ``request.block_hashes`` is set.
* ``make_kv_caches(vllm_config, kv_cache_config)``: CPU KV tensors laid out
  exactly as vLLM 0.33.0's ``allocate_kv_cache`` lays them out.
* ``make_worker_connector(vllm_config, kv_caches)``: the same connector
  class with role WORKER, ``register_kv_caches`` already called.
* ``FakeWorker``: the model-runner side of a step (request state, slot
  mapping, fake KV writes, connector hooks in model-runner order).
* ``make_forward_context`` / ``FakeAttentionMetadata``: what
  ``start_load_kv(forward_context)`` and ``save_kv_layer(...)`` take.
* ``step(scheduler, worker)``: one engine step; ``run_until_finished``.
* ``expected_kv(...)``: the KV the fake forward writes, to check loads.
* ``RecordingConnector``: a small connector that records its calls and
  reports a configured number of matched tokens (sync or async).

KV cache layout in vLLM 0.33.0 (RFC #42082, ``vllm/v1/kv_cache_layout.py``):
every attention layer's cache is a 4-D logical view ``[B, H, N, C]`` =
``[num_blocks, num_kv_heads, block_size, 2 * head_size]``, K in
``C[:head_size]`` and V in ``C[head_size:]`` (FlashAttention splits it with
``kv_cache.transpose(1, 2).split(head_size, dim=-1)``). There is no leading
``2`` dim any more and no ``get_kv_cache_shape``. The physical order is the
resolved ``KVCacheLayout`` (``cache_config.kv_cache_layout``); FlashAttention
declares no preference, so the default ``LBNHC`` ("NHD") wins: all layers
share one int8 allocation, each layer a contiguous region, inside a block
token-major ``[N, H, C]``; with ``num_kv_heads > 1`` the ``[B, H, N, C]``
view is therefore NOT contiguous (strides ``(N*H*C, C, H*C, 1)``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

# No network, no telemetry: set before vllm / transformers are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")

import torch  # noqa: E402

from vllm.config import (  # noqa: E402
    CacheConfig,
    DeviceConfig,
    KVTransferConfig,
    ModelConfig,
    SchedulerConfig,
    VllmConfig,
)
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: E402
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.forward_context import ForwardContext, override_forward_context  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.attention.backend import AttentionMetadata  # noqa: E402
from vllm.v1.attention.backends.utils import (  # noqa: E402
    get_supported_kv_cache_layouts,
    resolve_kv_cache_layout,
)
from vllm.v1.core import kv_cache_utils  # noqa: E402
try:  # SCRATCH-COMPAT
    from vllm.v1.core.kv_cache_planning import (  # noqa: E402
        get_global_kv_cache_groups,
        get_kv_cache_configs,
    )
    from vllm.v1.core.kv_cache_utils import resolve_cache_hit_alignment_tokens
except ImportError:
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs
    get_global_kv_cache_groups = None
    resolve_cache_hit_alignment_tokens = None
from vllm.v1.core.kv_cache_utils import (  # noqa: E402
    generate_scheduler_kv_cache_config,
    get_request_block_hasher,
    resolve_kv_cache_block_sizes,
)
from vllm.v1.core.sched.output import SchedulerOutput  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402
from vllm.v1.worker.utils import allocate_kv_cache  # noqa: E402

# Token ids of the tiny tokenizer (see make_model_dir).
PAD_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID, UNK_TOKEN_ID = 0, 1, 2, 3
# What the fake model samples unless told otherwise (not EOS).
DEFAULT_SAMPLED_TOKEN = 7
# vLLM names Llama attention layers like this; they key kv_caches and metadata.
LAYER_NAME = "model.layers.{}.self_attn.attn"


# --------------------------------------------------------------------------
# Model directory and configs
# --------------------------------------------------------------------------


def make_model_dir(
    tmp_path: Any,
    *,
    num_layers: int = 2,
    hidden_size: int = 128,
    num_heads: int = 2,
    num_kv_heads: int = 2,
    vocab_size: int = 256,
    max_position_embeddings: int = 2048,
) -> str:
    """Write a tiny random Llama ``config.json`` and a local WordLevel tokenizer
    (tokens ``<pad> <s> </s> <unk> t4 .. t{vocab-1}``) into ``tmp_path/model``;
    return that directory. No weights (vLLM's config path never reads them).

    Defaults give 2 layers, 2 KV heads, head_size 64, float16: the layout
    kvtier's own tests use (``conftest.namespace``).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    model_dir = os.path.join(os.fspath(tmp_path), "model")
    os.makedirs(model_dir, exist_ok=True)
    LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        torch_dtype="float16",
    ).save_pretrained(model_dir)
    vocab = {"<pad>": PAD_TOKEN_ID, "<s>": BOS_TOKEN_ID, "</s>": EOS_TOKEN_ID, "<unk>": UNK_TOKEN_ID}
    vocab.update({f"t{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    ).save_pretrained(model_dir)
    return model_dir


def make_vllm_config(
    model_dir: str,
    connector_name: str | None,
    module_path: str | None = None,
    extra_config: dict[str, Any] | None = None,
    *,
    block_size: int = 16,
    num_gpu_blocks: int = 128,
    max_num_batched_tokens: int = 256,
    max_num_seqs: int = 16,
    max_model_len: int = 1024,
    kv_role: str = "kv_both",
    enable_prefix_caching: bool = True,
    enable_chunked_prefill: bool = True,
    kv_load_failure_policy: str = "fail",
    kv_cache_layout: str | None = None,
    engine_id: str | None = None,
    kv_events_config: Any = None,
) -> VllmConfig:
    """A CPU ``VllmConfig`` whose ``kv_transfer_config`` is
    ``KVTransferConfig(kv_connector=connector_name,
    kv_connector_module_path=module_path, kv_role=kv_role,
    kv_connector_extra_config=extra_config)`` (``connector_name=None``: no
    connector).

    ``num_gpu_blocks`` becomes ``num_gpu_blocks_override`` (the block pool
    holds one of them back as the null block). ``async_scheduling`` is forced
    off so the plain ``Scheduler`` is the right class (vLLM 0.33.0 turns it on
    by default and would pick ``AsyncScheduler``). ``kv_load_failure_policy``
    defaults to vLLM's own default, ``"fail"``. ``kv_cache_layout`` (e.g.
    ``"LBHNC"``) pre-sets the layout, which resolution then honours as is.
    ``kv_events_config``: vLLM's ``KVEventsConfig`` (KV events published
    by the scheduler), or None.
    """
    model_config = ModelConfig(
        model=model_dir,
        tokenizer=model_dir,
        dtype="float16",
        seed=0,
        max_model_len=max_model_len,
    )
    scheduler_config = SchedulerConfig(
        max_model_len=max_model_len,
        is_encoder_decoder=False,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        enable_chunked_prefill=enable_chunked_prefill,
        async_scheduling=False,
    )
    cache_config = CacheConfig(
        block_size=block_size,
        enable_prefix_caching=enable_prefix_caching,
        num_gpu_blocks_override=num_gpu_blocks,
    )
    if kv_cache_layout is not None:
        cache_config.kv_cache_layout = kv_cache_layout
    kv_transfer_config = None
    if connector_name is not None:
        kv_transfer_config = KVTransferConfig(
            kv_connector=connector_name,
            kv_connector_module_path=module_path,
            kv_role=kv_role,
            kv_connector_extra_config=dict(extra_config or {}),
            kv_load_failure_policy=kv_load_failure_policy,
            kv_buffer_device="cpu",
            engine_id=engine_id,
        )
    events = {} if kv_events_config is None else {"kv_events_config": kv_events_config}
    return VllmConfig(
        model_config=model_config,
        scheduler_config=scheduler_config,
        cache_config=cache_config,
        kv_transfer_config=kv_transfer_config,
        device_config=DeviceConfig(device="cpu"),
        **events,
    )


def attention_specs(vllm_config: VllmConfig) -> dict[str, FullAttentionSpec]:
    """Per-layer ``FullAttentionSpec`` for the model, as the Llama attention
    layers would report them (names ``LAYER_NAME``)."""
    mc, pc, cc = vllm_config.model_config, vllm_config.parallel_config, vllm_config.cache_config
    if cc.cache_dtype not in ("auto", None):
        raise NotImplementedError("the harness only supports cache_dtype='auto'")
    return {
        LAYER_NAME.format(i): FullAttentionSpec(
            block_size=cc.block_size,
            num_kv_heads=mc.get_num_kv_heads(pc),
            head_size=mc.get_head_size(),
            dtype=mc.dtype,
        )
        for i in range(mc.get_num_layers(pc))
    }


def make_kv_cache_config(vllm_config: VllmConfig) -> KVCacheConfig:
    """The ``KVCacheConfig`` the engine core would build for the tiny model,
    from vLLM's own planner: layout resolution (honours
    ``VLLM_KV_CACHE_LAYOUT`` and the connector's
    ``get_required_kvcache_layout``), one full-attention group, exactly
    ``num_gpu_blocks`` blocks. Also sets ``cache_config.num_gpu_blocks``.
    """
    specs = attention_specs(vllm_config)
    # FlashAttention (and the other CUDA backends for this model) declare no
    # layout preference; an empty backend list yields vLLM's default order.
    supported = [layout.name for layout in get_supported_kv_cache_layouts([])]
    resolve_kv_cache_layout(vllm_config, [supported], specs.values())
    num_blocks = vllm_config.cache_config.num_gpu_blocks_override
    assert num_blocks is not None, "make_vllm_config sets num_gpu_blocks_override"
    # Any memory figure works: the override decides the block count.
    if get_global_kv_cache_groups is None:  # SCRATCH-COMPAT 0.31
        (kv_cache_config,) = get_kv_cache_configs(vllm_config, [specs], [1 << 40])
    else:
        groups = get_global_kv_cache_groups(vllm_config, [specs])
        (kv_cache_config,) = get_kv_cache_configs(vllm_config, [specs], [1 << 40], groups)
    kv_cache_config.kv_cache_layout = vllm_config.cache_config.kv_cache_layout
    sched_cfg = generate_scheduler_kv_cache_config([kv_cache_config])
    vllm_config.cache_config.num_gpu_blocks = sched_cfg.num_blocks
    block_size, hash_block_size = resolve_kv_cache_block_sizes(sched_cfg, vllm_config)
    if resolve_cache_hit_alignment_tokens is not None:  # SCRATCH-COMPAT 0.31
        alignment = resolve_cache_hit_alignment_tokens(sched_cfg, vllm_config, block_size, hash_block_size)
        kv_cache_config.hash_block_size = hash_block_size
        kv_cache_config.cache_hit_alignment_tokens = alignment
    return kv_cache_config


def make_scheduler(
    vllm_config: VllmConfig,
    kv_cache_config: KVCacheConfig | None = None,
    *,
    log_stats: bool = True,
) -> Scheduler:
    """vLLM's real v1 ``Scheduler`` (built like ``EngineCore`` builds it).
    The scheduler-side connector (role SCHEDULER, created by
    ``KVConnectorFactory`` from the config) is ``scheduler.connector``;
    the ``KVCacheConfig`` is ``scheduler.kv_cache_config``.
    """
    if kv_cache_config is None:
        kv_cache_config = make_kv_cache_config(vllm_config)
    block_size, hash_block_size = resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)
    return Scheduler(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=block_size,
        hash_block_size=hash_block_size,
        log_stats=log_stats,
    )


# --------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------

_none_hash_fn: Callable[[Any], bytes] | None = None


def block_hash_fn(hash_algo: str = "sha256") -> Callable[[Any], bytes]:
    """vLLM's prefix-cache hash function by name, with the module-global
    ``NONE_HASH`` (the parent of a prefix's first block) initialised for it
    as ``EngineCore`` does. sha256 / sha256_cbor use a fixed seed
    ("vllm-none-hash", or ``PYTHONHASHSEED``), so their hashes agree across
    processes and instances and re-initialising is harmless; xxhash seeds are
    random per process, so those are initialised once only.
    """
    global _none_hash_fn
    fn = get_hash_fn_by_name(hash_algo)
    if hash_algo.startswith("sha256") or _none_hash_fn is not fn:
        kv_cache_utils.init_none_hash(fn)
        _none_hash_fn = fn
    return fn


def make_request(
    request_id: str,
    prompt_token_ids: list[int],
    max_tokens: int = 4,
    block_size: int = 16,
    *,
    hash_algo: str = "sha256",
    ignore_eos: bool = False,
    kv_transfer_params: dict[str, Any] | None = None,
    cache_salt: str | None = None,
    lora_request: Any = None,
) -> Request:
    """A ``vllm.v1.request.Request`` hashed the way ``EngineCore`` hashes it
    (``get_request_block_hasher(block_size, hash_fn)``): ``request.block_hashes``
    holds one ``BlockHash`` (32 raw sha256 bytes) per FULL block of
    ``block_size`` tokens, chained from ``NONE_HASH``, and grows as output
    tokens are appended. ``block_size`` must be the scheduler's hash block
    size (``cache_config.block_size`` for this single-group model).
    """
    sampling_params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
    sampling_params.update_from_generation_config({}, EOS_TOKEN_ID)
    request = Request(
        request_id=request_id,
        prompt_token_ids=list(prompt_token_ids),
        sampling_params=sampling_params,
        pooling_params=None,
        cache_salt=cache_salt,
        lora_request=lora_request,
        block_hasher=get_request_block_hasher(block_size, block_hash_fn(hash_algo)),
    )
    request.kv_transfer_params = kv_transfer_params
    return request


def chain_block_hashes(token_ids: list[int], block_size: int = 16, hash_algo: str = "sha256") -> list[bytes]:
    """The block hashes vLLM computes for ``token_ids`` (no extra keys), for
    tests that want them without a ``Request``."""
    fn = block_hash_fn(hash_algo)
    out: list[bytes] = []
    parent = None
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = kv_cache_utils.hash_block_tokens(fn, parent, token_ids[start : start + block_size], None)
        out.append(parent)
    return out


# --------------------------------------------------------------------------
# Worker side: KV tensors, connector, forward context
# --------------------------------------------------------------------------


def make_kv_caches(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> dict[str, torch.Tensor]:
    """Zeroed CPU KV caches, ``{layer_name: tensor}``, from vLLM's own
    ``allocate_kv_cache``: per layer a ``[num_blocks, num_kv_heads,
    block_size, 2 * head_size]`` float16 view (K then V in the last dim) of
    one shared int8 buffer, strides per the resolved ``KVCacheLayout``.
    """
    layout = vllm_config.cache_config.get_resolved_kv_cache_layout()
    return allocate_kv_cache(kv_cache_config, torch.device("cpu"), layout)


def make_worker_connector(
    vllm_config: VllmConfig,
    kv_caches: dict[str, torch.Tensor] | None = None,
    kv_cache_config: KVCacheConfig | None = None,
) -> KVConnectorBase_V1:
    """The configured connector class with role WORKER, built by
    ``KVConnectorFactory.create_connector`` (so module-path loading and the
    HMA check are vLLM's), with ``register_kv_caches(kv_caches)`` called as
    the model runner calls it. ``kv_caches`` defaults to ``make_kv_caches``;
    the tensors are on ``connector.harness_kv_caches`` either way.
    """
    if kv_cache_config is None:
        kv_cache_config = make_kv_cache_config(vllm_config)
    if kv_caches is None:
        kv_caches = make_kv_caches(vllm_config, kv_cache_config)
    connector = KVConnectorFactory.create_connector(vllm_config, KVConnectorRole.WORKER, kv_cache_config)
    assert isinstance(connector, KVConnectorBase_V1)
    connector.register_kv_caches(kv_caches)
    connector.harness_kv_caches = kv_caches  # type: ignore[attr-defined]
    return connector


@dataclass
class FakeAttentionMetadata(AttentionMetadata):
    """Stands in for a backend's per-layer attention metadata. Only the fields
    a connector may reasonably read: the step's flattened token slots and the
    per-request split. ``slot_mapping[i] = block_id * block_size + offset``
    for token ``i`` of the batch (requests in ``req_ids`` order)."""

    slot_mapping: torch.Tensor
    num_actual_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    req_ids: list[str]
    block_table: list[list[int]]
    block_size: int
    max_query_len: int = 0
    max_seq_len: int = 0


class FakeAttentionLayer(SimpleNamespace):
    """What ``forward_context.no_compile_layers[name]`` is to a connector:
    an object with ``.kv_cache`` (the layer's KV tensor) and ``.layer_name``."""


def make_forward_context(
    kv_caches: dict[str, torch.Tensor],
    attn_metadata: dict[str, AttentionMetadata] | None,
    slot_mapping: dict[str, torch.Tensor] | None = None,
) -> ForwardContext:
    """A real ``vllm.forward_context.ForwardContext`` with fake attention
    layers. ``attn_metadata=None`` is what a step without forward (only KV
    transfers) passes. Use ``with override_forward_context(ctx):`` to make
    ``get_forward_context()`` return it."""
    layers = {name: FakeAttentionLayer(kv_cache=t, layer_name=name) for name, t in kv_caches.items()}
    return ForwardContext(no_compile_layers=layers, attn_metadata=attn_metadata, slot_mapping=slot_mapping or {})


def expected_kv(
    layer_index: int,
    token_ids: Iterable[int],
    positions: Iterable[int],
    num_kv_heads: int,
    head_size: int,
    dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """The ``[T, num_kv_heads, 2 * head_size]`` KV the fake forward writes for
    these tokens: a function of (layer, token id, position, head, channel),
    exact in float16 (multiples of 1/64 below 16)."""
    tok = torch.tensor(list(token_ids), dtype=torch.int64)
    pos = torch.tensor(list(positions), dtype=torch.int64)
    h = torch.arange(num_kv_heads).view(1, -1, 1)
    c = torch.arange(2 * head_size).view(1, 1, -1)
    base = (tok * 31 + pos * 7 + layer_index * 13).view(-1, 1, 1)
    return (((base + h * 5 + c) % 1024).to(torch.float32) / 64).to(dtype)


def read_kv(kv_cache: torch.Tensor, block_ids: list[int], num_tokens: int) -> torch.Tensor:
    """``[num_tokens, H, 2D]`` gathered from a ``[B, H, N, 2D]`` layer cache
    along ``block_ids`` (token ``i`` in block ``block_ids[i // N]``)."""
    n = kv_cache.shape[2]
    slots = [block_ids[i // n] * n + i % n for i in range(num_tokens)]
    idx = torch.tensor(slots, dtype=torch.int64)
    return kv_cache[idx // n, :, idx % n]


@dataclass
class _WorkerRequest:
    token_ids: list[int]
    block_ids: list[list[int]]
    num_computed_tokens: int


@dataclass
class WorkerStepRecord:
    """What the fake worker did in one step (for assertions)."""

    req_ids: list[str] = field(default_factory=list)
    num_tokens: dict[str, int] = field(default_factory=dict)
    positions: dict[str, list[int]] = field(default_factory=dict)
    slot_mapping: torch.Tensor | None = None
    forward: bool = False
    load_started_before_forward: bool = False
    kv_connector_output: KVConnectorOutput | None = None


class FakeWorker:
    """The model-runner half of a step, without a model.

    Keeps per-request state (tokens, block table, computed tokens) from the
    ``SchedulerOutput`` the way the GPU model runner does, writes
    ``expected_kv`` for every scheduled token into the paged KV caches (what
    the attention layers' cache update stores), and drives the worker
    connector in the order of vLLM 0.33.0's model runner. ``runner="v2"``
    (the default runner in 0.33.0, ``vllm/v1/worker/gpu/kv_connector.py``):

    1. ``handle_preemptions(meta)``, ``bind_connector_metadata(meta)``;
    2. iff ``scheduler_output.has_sync_kv_loads``: ``start_load_kv(ctx,
       **load_kwargs)`` before the forward, ``ctx.attn_metadata`` set;
    3. per layer: ``wait_for_layer_load(name)``, KV written,
       ``save_kv_layer(name, kv_caches[name], attn_metadata[name])``;
       then ``finish_forward()``;
    4. otherwise ``start_load_kv(ctx, **load_kwargs)`` after the forward,
       outside its context: ``ctx.attn_metadata`` is None;
    5. ``wait_for_save()``; ``get_transfer_results(finished_req_ids)``;
       ``get_block_ids_with_load_errors()``; stats, events, worker meta;
       ``clear_connector_metadata()``.

    ``load_kwargs`` (v2 only, steps with a forward): ``scheduler_output``,
    ``request_state_indices``, ``request_ids``, ``num_tokens``.
    ``runner="v1"`` (``KVConnectorModelRunnerMixin``): no kwargs, no
    ``finish_forward``, and an async ``start_load_kv`` still sees the
    forward's context. A step with no scheduled tokens (only transfers) makes
    no layer calls and passes a context whose ``attn_metadata`` is None.
    ``connector=None`` runs the fake forward only.
    """

    def __init__(
        self,
        vllm_config: VllmConfig,
        kv_cache_config: KVCacheConfig,
        connector: KVConnectorBase_V1 | None = None,
        kv_caches: dict[str, torch.Tensor] | None = None,
        *,
        write_kv: bool = True,
        runner: str = "v2",
    ):
        assert runner in ("v1", "v2"), runner
        self.runner = runner
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        self.connector = connector
        if kv_caches is None:
            kv_caches = getattr(connector, "harness_kv_caches", None)
        if kv_caches is None:
            kv_caches = make_kv_caches(vllm_config, kv_cache_config)
            if connector is not None:
                connector.register_kv_caches(kv_caches)
        self.kv_caches = kv_caches
        self.write_kv = write_kv
        (group,) = kv_cache_config.kv_cache_groups  # the harness models one group
        self.layer_names: list[str] = list(group.layer_names)
        self.block_size: int = group.kv_cache_spec.block_size
        self.num_kv_heads: int = group.kv_cache_spec.num_kv_heads
        self.head_size: int = group.kv_cache_spec.head_size
        self.requests: dict[str, _WorkerRequest] = {}
        self.history: list[WorkerStepRecord] = []

    # -- request state, like GPUModelRunner._update_states ------------------
    def _update_states(self, so: SchedulerOutput) -> None:
        for req_id in so.finished_req_ids:
            self.requests.pop(req_id, None)
        for copy in so.kv_cache_block_copies or ():
            for t in self.kv_caches.values():
                t[copy.dst_block_id].copy_(t[copy.src_block_id])
        for new in so.scheduled_new_reqs:
            self.requests[new.req_id] = _WorkerRequest(
                token_ids=list(getattr(new, "prefill_token_ids", None) or new.prompt_token_ids or []),  # SCRATCH-COMPAT
                block_ids=[list(g) for g in new.block_ids],
                num_computed_tokens=new.num_computed_tokens,
            )
        cached = so.scheduled_cached_reqs
        resumed_ids = getattr(cached, "resumed_req_ids", set())  # SCRATCH-COMPAT
        all_tok = getattr(cached, "all_token_ids", {})  # SCRATCH-COMPAT
        for i, req_id in enumerate(cached.req_ids):
            state = self.requests.get(req_id)
            new_blocks = cached.new_block_ids[i]
            if req_id in resumed_ids or state is None:
                assert new_blocks is not None, f"{req_id}: resumed without block ids"
                tokens = all_tok.get(req_id, state.token_ids if state else [])
                state = self.requests[req_id] = _WorkerRequest(list(tokens), [list(g) for g in new_blocks], 0)
            elif new_blocks is not None:
                for group_blocks, added in zip(state.block_ids, new_blocks):
                    group_blocks.extend(added)
            if req_id in all_tok:
                state.token_ids = list(all_tok[req_id])
            state.num_computed_tokens = cached.num_computed_tokens[i]

    def _metadata(self, so: SchedulerOutput, record: WorkerStepRecord) -> dict[str, AttentionMetadata]:
        slots: list[int] = []
        starts, seq_lens, tables = [0], [], []
        for req_id, n in so.num_scheduled_tokens.items():
            state = self.requests[req_id]
            first = state.num_computed_tokens
            positions = list(range(first, first + n))
            blocks = state.block_ids[0]
            slots.extend(blocks[p // self.block_size] * self.block_size + p % self.block_size for p in positions)
            record.req_ids.append(req_id)
            record.num_tokens[req_id] = n
            record.positions[req_id] = positions
            starts.append(starts[-1] + n)
            seq_lens.append(first + n)
            tables.append(list(blocks))
        slot_mapping = torch.tensor(slots, dtype=torch.int64)
        record.slot_mapping = slot_mapping
        meta = FakeAttentionMetadata(
            slot_mapping=slot_mapping,
            num_actual_tokens=len(slots),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            req_ids=list(record.req_ids),
            block_table=tables,
            block_size=self.block_size,
            max_query_len=max(record.num_tokens.values(), default=0),
            max_seq_len=max(seq_lens, default=0),
        )
        return {name: meta for name in self.layer_names}

    def _write_layer(self, layer_index: int, name: str, record: WorkerStepRecord) -> None:
        kv = self.kv_caches[name]
        for req_id in record.req_ids:
            state = self.requests[req_id]
            positions = record.positions[req_id]
            tokens = [state.token_ids[p] if p < len(state.token_ids) else 0 for p in positions]
            values = expected_kv(layer_index, tokens, positions, self.num_kv_heads, self.head_size, kv.dtype)
            idx = torch.tensor(
                [state.block_ids[0][p // self.block_size] * self.block_size + p % self.block_size for p in positions],
                dtype=torch.int64,
            )
            kv[idx // self.block_size, :, idx % self.block_size] = values

    def execute(self, so: SchedulerOutput, sampled: dict[str, list[int]] | None = None) -> KVConnectorOutput | None:
        """Run the worker side of one step; return the worker connector's
        ``KVConnectorOutput`` (None without a connector). ``sampled``: the
        tokens this step samples, appended to the worker's request state."""
        record = WorkerStepRecord()
        c = self.connector
        meta = so.kv_connector_metadata
        self._update_states(so)
        record.forward = so.total_num_scheduled_tokens > 0
        attn = self._metadata(so, record) if record.forward else None
        slots = {n: record.slot_mapping for n in self.layer_names} if attn else None
        fwd_ctx = make_forward_context(self.kv_caches, attn, slots)
        idle_ctx = make_forward_context(self.kv_caches, None)  # no forward running
        load_kwargs: dict[str, Any] = {}
        if self.runner == "v2" and record.forward:
            load_kwargs = dict(
                scheduler_output=so,
                request_state_indices=torch.arange(len(record.req_ids), dtype=torch.int64),
                request_ids=list(record.req_ids),
                num_tokens=so.total_num_scheduled_tokens,
            )
        out = None
        if c is not None:
            assert meta is not None, "scheduler built no connector metadata"
            c.handle_preemptions(meta)
            c.bind_connector_metadata(meta)
        if c is not None and so.has_sync_kv_loads:
            record.load_started_before_forward = True
            with override_forward_context(fwd_ctx):
                c.start_load_kv(fwd_ctx, **load_kwargs)
        if record.forward:
            with override_forward_context(fwd_ctx):
                for i, name in enumerate(self.layer_names):
                    if c is not None:
                        c.wait_for_layer_load(name)
                    if self.write_kv:
                        self._write_layer(i, name, record)
                    if c is not None:
                        c.save_kv_layer(name, self.kv_caches[name], attn[name])
            if c is not None and self.runner == "v2":
                c.finish_forward()
        if c is not None:
            if not so.has_sync_kv_loads:
                # V2 submits async loads after the forward, outside its forward
                # context (so attn_metadata is None); V1 inside it.
                ctx = idle_ctx if self.runner == "v2" or not record.forward else fwd_ctx
                with override_forward_context(ctx):
                    c.start_load_kv(ctx, **load_kwargs)
            c.wait_for_save()
            results = c.get_transfer_results(so.finished_req_ids)
            out = KVConnectorOutput(
                finished_sending=results.finished_sending or None,
                finished_recving=results.finished_recving or None,
                failed_recving=set(results.failed_recving),
                invalid_block_ids=set(c.get_block_ids_with_load_errors()),
                kv_connector_stats=c.get_kv_connector_stats(),
                kv_cache_events=c.get_kv_connector_kv_cache_events(),
                kv_connector_worker_meta=c.build_connector_worker_meta(),
            )
            c.clear_connector_metadata()
        for req_id, toks in (sampled or {}).items():
            if req_id in self.requests:
                self.requests[req_id].token_ids.extend(toks)
        record.kv_connector_output = out
        self.history.append(record)
        return out


def make_worker(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None = None, **kw: Any) -> FakeWorker:
    """``FakeWorker`` around ``make_worker_connector(vllm_config)`` (or no
    connector when the config has none)."""
    if kv_cache_config is None:
        kv_cache_config = make_kv_cache_config(vllm_config)
    connector = None
    if vllm_config.kv_transfer_config is not None:
        connector = make_worker_connector(vllm_config, kv_cache_config=kv_cache_config)
    return FakeWorker(vllm_config, kv_cache_config, connector, **kw)


# --------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------


def merge_kv_connector_outputs(a: KVConnectorOutput | None, b: KVConnectorOutput | None) -> KVConnectorOutput | None:
    """Union of two outputs' id sets (``b``'s other fields win when set)."""
    if a is None or b is None:
        return b if a is None else a

    def union(x, y):
        s = set(x or ()) | set(y or ())
        return s or None

    return KVConnectorOutput(
        finished_sending=union(a.finished_sending, b.finished_sending),
        finished_recving=union(a.finished_recving, b.finished_recving),
        failed_recving=set(a.failed_recving) | set(b.failed_recving),
        invalid_block_ids=set(a.invalid_block_ids) | set(b.invalid_block_ids),
        kv_connector_stats=b.kv_connector_stats or a.kv_connector_stats,
        kv_cache_events=b.kv_cache_events or a.kv_cache_events,
        kv_connector_worker_meta=b.kv_connector_worker_meta or a.kv_connector_worker_meta,
        expected_finished_count=b.expected_finished_count or a.expected_finished_count,
    )


def make_model_runner_output(
    scheduler_output: SchedulerOutput,
    sampled: dict[str, list[int]],
    kv_connector_output: KVConnectorOutput | None = None,
) -> ModelRunnerOutput:
    """The ``ModelRunnerOutput`` the runner returns: one row per scheduled
    request (``sampled[req_id]``, ``[]`` for a partial prefill). A step with
    nothing scheduled returns ``with_kv_conn_output_only`` (the shared empty
    output when the KV output is empty), as the runner does."""
    if not scheduler_output.num_scheduled_tokens:
        return ModelRunnerOutput.with_kv_conn_output_only(kv_connector_output)
    req_ids = list(scheduler_output.num_scheduled_tokens)
    extra = {}
    if "req_id_to_index" in ModelRunnerOutput.__dataclass_fields__:  # SCRATCH-COMPAT
        extra["req_id_to_index"] = {r: i for i, r in enumerate(req_ids)}
    return ModelRunnerOutput(
        req_ids=req_ids,
        **extra,
        sampled_token_ids=[list(sampled.get(r, [])) for r in req_ids],
        kv_connector_output=kv_connector_output,
    )


class StepResult(NamedTuple):
    scheduler_output: SchedulerOutput
    model_runner_output: ModelRunnerOutput
    engine_core_outputs: dict  # client index -> EngineCoreOutputs

    def outputs(self) -> list:
        return [o for eco in self.engine_core_outputs.values() for o in eco.outputs]

    @property
    def scheduler_stats(self):
        """This step's ``SchedulerStats`` (``log_stats=True``), e.g.
        ``.connector_prefix_cache_stats.hits`` = external hit tokens."""
        for eco in self.engine_core_outputs.values():
            if eco.scheduler_stats is not None:
                return eco.scheduler_stats
        return None

    @property
    def finished(self) -> set[str]:
        """Ids of requests that finished (stop, length, error) this step."""
        return {o.request_id for o in self.outputs() if o.finish_reason is not None}


KVOutputHook = Callable[[SchedulerOutput, "KVConnectorOutput | None"], "KVConnectorOutput | None"]


def step(
    scheduler: Scheduler,
    worker: FakeWorker | None = None,
    *,
    kv_connector_output: KVConnectorOutput | None = None,
    kv_output_hook: KVOutputHook | None = None,
    sampled_token: int | Callable[[Request], int] = DEFAULT_SAMPLED_TOKEN,
) -> StepResult:
    """One engine step: ``schedule()``, the worker (if any), a fabricated
    ``ModelRunnerOutput``, ``update_from_output()``.

    Every scheduled request that is not mid-prefill (``request.is_prefill_chunk``
    False after scheduling) samples ``sampled_token`` (or
    ``sampled_token(request)``). The KV output sent to the scheduler is the
    worker connector's, merged with ``kv_connector_output`` if given, then
    passed through ``kv_output_hook(scheduler_output, kv_out)`` whose return
    value is used: the places to inject ``finished_recving``,
    ``finished_sending``, ``invalid_block_ids``, ``failed_recving``.
    """
    so = scheduler.schedule()
    sampled: dict[str, list[int]] = {}
    for req_id in so.num_scheduled_tokens:
        request = scheduler.requests[req_id]
        if request.is_prefill_chunk:
            sampled[req_id] = []
        else:
            tok = sampled_token(request) if callable(sampled_token) else sampled_token
            sampled[req_id] = [tok]
    kv_out = worker.execute(so, sampled) if worker is not None else None
    kv_out = merge_kv_connector_outputs(kv_out, kv_connector_output)
    if kv_output_hook is not None:
        kv_out = kv_output_hook(so, kv_out)
    mro = make_model_runner_output(so, sampled, kv_out)
    eco = scheduler.update_from_output(so, mro)
    return StepResult(so, mro, eco)


def run_until_finished(
    scheduler: Scheduler,
    worker: FakeWorker | None = None,
    request_ids: Iterable[str] | None = None,
    *,
    max_steps: int = 64,
    drain: bool = True,
    **step_kwargs: Any,
) -> list[StepResult]:
    """Step until every id in ``request_ids`` (default: all known) finished;
    with ``drain`` keep stepping until the scheduler holds nothing (pending
    async sends included). Raises after ``max_steps``. A connector that
    stores off the step (``flush_saves``) has stored what these steps saved
    when it returns, so a test reads it back deterministically."""
    pending = set(request_ids) if request_ids is not None else set(scheduler.requests)
    results: list[StepResult] = []
    for _ in range(max_steps):
        if not pending and not (drain and scheduler.has_requests()):
            flush = getattr(getattr(worker, "connector", None), "flush_saves", None)
            if flush is not None:
                flush()
            return results
        res = step(scheduler, worker, **step_kwargs)
        results.append(res)
        pending -= res.finished
    if pending or (drain and scheduler.has_requests()):
        raise AssertionError(f"not finished after {max_steps} steps: {sorted(pending)}")
    return results


def add_requests(scheduler: Scheduler, *requests: Request) -> None:
    for r in requests:
        scheduler.add_request(r)


# --------------------------------------------------------------------------
# A connector that records calls (loadable as module path "vllm_harness")
# --------------------------------------------------------------------------


@dataclass
class RecordingMetadata(KVConnectorMetadata):
    loads: dict[str, list[int]] = field(default_factory=dict)  # req_id -> block ids
    new_req_ids: list[str] = field(default_factory=list)


class RecordingConnector(KVConnectorBase_V1):
    """Reports ``extra_config["matched_tokens"]`` (capped to whole blocks
    below the prompt's last token) as external hits, sync or
    ``extra_config["async"]``; the worker reports an async load finished
    ``extra_config["load_steps"]`` (default 1) ``get_transfer_results`` calls
    after ``start_load_kv`` saw it. ``calls`` lists ``(method, detail)``.
    ``extra_config["fail_load"]``: the worker reports the first block of
    each load in ``get_block_ids_with_load_errors``."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.matched_tokens = int(extra.get("matched_tokens", 0))
        self.is_async = bool(extra.get("async", False))
        self.load_steps = int(extra.get("load_steps", 1))
        self.fail_load = bool(extra.get("fail_load", False))
        self.block_size = vllm_config.cache_config.block_size
        self.calls: list[tuple[str, Any]] = []
        self._pending: dict[str, list[int]] = {}  # scheduler: loads to put in meta
        self._local_tokens: dict[str, int] = {}  # scheduler: local hit per request
        self._inflight: dict[str, int] = {}  # worker: req_id -> steps left
        self._errors: set[int] = set()
        self.kv_caches: dict[str, torch.Tensor] = {}

    # scheduler side
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        limit = (request.num_prompt_tokens - 1) // self.block_size * self.block_size
        hit = max(0, min(self.matched_tokens, limit) - num_computed_tokens)
        self._local_tokens[request.request_id] = num_computed_tokens
        self.calls.append(("get_num_new_matched_tokens", (request.request_id, num_computed_tokens, hit)))
        return hit, self.is_async and hit > 0

    def update_state_after_alloc(self, request: Request, blocks: Any, num_external_tokens: int):
        block_ids = list(blocks.get_block_ids()[0])
        self.calls.append(("update_state_after_alloc", (request.request_id, block_ids, num_external_tokens)))
        if num_external_tokens > 0:
            # The external tokens follow the local prefix-cache hit.
            first = self._local_tokens.get(request.request_id, 0) // self.block_size
            self._pending[request.request_id] = block_ids[first : first + num_external_tokens // self.block_size]

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        new_ids = [r.req_id for r in scheduler_output.scheduled_new_reqs]
        meta = RecordingMetadata(loads=self._pending, new_req_ids=new_ids)
        self._pending = {}
        self.calls.append(("build_connector_meta", dict(meta.loads)))
        return meta

    def update_connector_output(self, connector_output: KVConnectorOutput):
        self.calls.append(("update_connector_output", connector_output))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self.calls.append(("request_finished", (request.request_id, list(block_ids))))
        return False, None

    # worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        self.kv_caches = kv_caches
        self.calls.append(("register_kv_caches", {k: tuple(v.shape) for k, v in kv_caches.items()}))

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, RecordingMetadata)
        self.calls.append(("start_load_kv", (dict(meta.loads), forward_context.attn_metadata is not None)))
        for req_id, block_ids in meta.loads.items():
            if self.fail_load and block_ids:
                self._errors.add(block_ids[0])
            if self.is_async:
                self._inflight[req_id] = self.load_steps

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.calls.append(("wait_for_layer_load", layer_name))

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        self.calls.append(("save_kv_layer", (layer_name, tuple(kv_layer.shape), attn_metadata.num_actual_tokens)))

    def wait_for_save(self):
        self.calls.append(("wait_for_save", None))

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done = set()
        for req_id in list(self._inflight):
            self._inflight[req_id] -= 1
            if self._inflight[req_id] <= 0:
                done.add(req_id)
                del self._inflight[req_id]
        self.calls.append(("get_finished", (set(finished_req_ids), done)))
        return None, done or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        return errors

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]
