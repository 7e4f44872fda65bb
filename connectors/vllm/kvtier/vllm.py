"""kvtier's vLLM connector: ``KvTierConnector(KVConnectorBase_V1)``.

Enable it with::

    --kv-transfer-config '{"kv_connector": "KvTierConnector",
                           "kv_connector_module_path": "kvtier.vllm",
                           "kv_role": "kv_both",
                           "kv_connector_extra_config": {...}}'

Extra config (every key optional; an unknown key is an error at startup):

- ``mode``: ``"embedded"`` (the block manager in the engine process; TP = 1)
  or ``"daemon"`` (a local kvtierd).
- ``endpoint``, ``token``: the daemon's address and bearer token.
- ``host_capacity_bytes``: host-RAM tier of the embedded store (default 4 GiB;
  0 for none).
- ``disk_dir``, ``disk_capacity_bytes``: SSD tier of the embedded store
  (none unless ``disk_dir`` is set).
- ``store``: a full embedded store config (the keys of deploy/kvtier.toml),
  instead of the two above.
- ``salt``: a namespace salt (e.g. a cache salt shared by a tenant).
- ``tier_events``: ``"auto"`` (default: on when vLLM publishes KV events),
  true or false: tier-tagged KV events for a KV-aware router (see
  ``kvtier.vllm_events``); ``tier_events_max_blocks`` bounds their table.
- ``load_mode``: ``"async"`` (default: the request waits for its blocks
  while the scheduler runs others; loads run on worker threads) or
  ``"sync"`` (loads complete in ``start_load_kv`` before the forward pass).

One kvtier block is one vLLM block (``block_size`` tokens) across all layers,
K then V, stored contiguously. Its key is vLLM's own block hash inside a
kvtier namespace that fingerprints the model, revision, dtype, layout, TP
rank and size and the salt, so another model's KV never matches.

Loads are asynchronous by default: a hit makes the request wait for its
blocks (vLLM's WAITING_FOR_REMOTE_KVS) while the scheduler runs the others,
and ``get_finished`` reports the load done. Saves copy the blocks out in
``wait_for_save`` (so vLLM may reuse them at once) and store them there. A
failed or corrupt load is reported by ``get_block_ids_with_load_errors``, no
later than the pass that reports the load finished, so vLLM recomputes; a
daemon that is down means misses and a logged warning; a throttled one
(``ThrottledError``) means the same for that call, with the client kept.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

import kvtier

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger("kvtier.vllm")

EXTRA_KEYS = {
    "mode",
    "load_mode",
    "endpoint",
    "token",
    "host_capacity_bytes",
    "disk_dir",
    "disk_capacity_bytes",
    "store",
    "salt",
    "staging_bytes",
    "timeout_s",
    "transfer_timeout_s",
    "tier_events",
    "tier_events_max_blocks",
}

DTYPES = {
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float32: "f32",
}


def parse_extra_config(extra: dict[str, Any] | None) -> dict[str, Any]:
    """Checks the connector's extra config; names the key that is wrong."""
    extra = dict(extra or {})
    unknown = sorted(set(extra) - EXTRA_KEYS)
    if unknown:
        raise ValueError(
            f"kv_connector_extra_config: unknown key {unknown[0]!r} (known: {', '.join(sorted(EXTRA_KEYS))})"
        )
    mode = extra.setdefault("mode", "embedded")
    if mode not in ("embedded", "daemon"):
        raise ValueError(f"kv_connector_extra_config: mode {mode!r} must be 'embedded' or 'daemon'")
    load_mode = extra.setdefault("load_mode", "async")
    if load_mode not in ("async", "sync"):
        raise ValueError(f"kv_connector_extra_config: load_mode {load_mode!r} must be 'async' or 'sync'")
    for key in ("host_capacity_bytes", "disk_capacity_bytes", "staging_bytes"):
        if key in extra and (not isinstance(extra[key], int) or extra[key] < 0):
            raise ValueError(f"kv_connector_extra_config: {key} must be a non-negative integer")
    for key, default in (("timeout_s", DEFAULT_TIMEOUT_S), ("transfer_timeout_s", DEFAULT_TRANSFER_TIMEOUT_S)):
        t = extra.setdefault(key, default)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
            raise ValueError(f"kv_connector_extra_config: {key} must be a positive number of seconds")
    events = extra.setdefault("tier_events", "auto")
    if events not in ("auto", True, False):
        raise ValueError(f"kv_connector_extra_config: tier_events {events!r} must be 'auto', true or false")
    n = extra.setdefault("tier_events_max_blocks", 1 << 18)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError("kv_connector_extra_config: tier_events_max_blocks must be a positive integer")
    if "store" in extra and not isinstance(extra["store"], dict):
        raise ValueError("kv_connector_extra_config: store must be a table of store settings")
    return extra


# Daemon calls that take longer fail as unavailable. The scheduler's
# lookups (a miss) are on the engine's critical path: a wedged daemon holds
# it no longer than this. Worker loads and saves run off the step.
DEFAULT_TIMEOUT_S = 1.0
DEFAULT_TRANSFER_TIMEOUT_S = 30.0

_STORES: dict[str, Any] = {}
_STORES_LOCK = threading.Lock()


class _Daemon:
    """A kvtierd client that connects when it can: a daemon that is down at
    startup, or restarts later, means misses (UnavailableError), never a
    crash. Reconnects at most once every `retry_s`.

    Only ``UnavailableError`` drops the client: a throttled daemon
    (``ThrottledError``, a full queue) is up and answering, so the call
    fails like any other (a miss, a skipped save) and the client is kept;
    reconnecting would add load exactly when the daemon sheds it."""

    def __init__(self, endpoint: str, token: str | None, timeout_s: float = DEFAULT_TIMEOUT_S, retry_s: float = 2.0):
        self._endpoint, self._token, self._retry_s = endpoint, token, retry_s
        self._timeout_s = timeout_s
        self._client = None
        self._next_try = 0.0
        self._lock = threading.Lock()

    def _get(self):
        import time

        with self._lock:
            if self._client is None and time.monotonic() >= self._next_try:
                try:
                    self._client = kvtier.Client(self._endpoint, token=self._token, timeout_s=self._timeout_s)
                except kvtier.KvTierError as e:
                    self._next_try = time.monotonic() + self._retry_s
                    logger.warning("kvtier: daemon %s unavailable: %s", self._endpoint, e)
            if self._client is None:
                raise kvtier.UnavailableError(f"kvtierd at {self._endpoint} is unavailable")
            return self._client

    def __getattr__(self, name: str):
        def call(*args, **kwargs):
            try:
                return getattr(self._get(), name)(*args, **kwargs)
            except kvtier.ThrottledError:
                raise  # the daemon is up: keep the client
            except kvtier.UnavailableError:
                import time

                with self._lock:
                    # Reconnect after retry_s (the daemon may restart);
                    # until then calls fail at once instead of each
                    # waiting out its timeout on a wedged daemon.
                    self._client = None
                    self._next_try = time.monotonic() + self._retry_s
                raise

        return call


def open_store(extra: dict[str, Any], worker: bool = False):
    """The embedded store, or a daemon client (its calls bounded by
    ``transfer_timeout_s`` on a worker, ``timeout_s`` otherwise). The
    scheduler and worker connectors of one process share one embedded
    store."""
    if extra["mode"] == "daemon":
        timeout = extra["transfer_timeout_s" if worker else "timeout_s"]
        return _Daemon(extra.get("endpoint", "http://127.0.0.1:50051"), extra.get("token"), float(timeout))
    cfg = extra.get("store")
    if cfg is None:
        cfg = {}
        host = extra.get("host_capacity_bytes", 4 << 30)
        if host:
            cfg["host"] = {"capacity_bytes": host}
        if extra.get("disk_dir"):
            cfg["disk"] = {"dir": extra["disk_dir"], "capacity_bytes": extra.get("disk_capacity_bytes", 64 << 30)}
    key = json.dumps(cfg, sort_keys=True)
    with _STORES_LOCK:
        if key not in _STORES:
            _STORES[key] = kvtier.Store(cfg)
        return _STORES[key]


def _events_wanted(vllm_config: VllmConfig, extra: dict[str, Any]) -> bool:
    """Tier events: on when asked, or ("auto") when vLLM publishes KV events."""
    if extra["tier_events"] != "auto":
        return bool(extra["tier_events"])
    ev = getattr(vllm_config, "kv_events_config", None)
    return bool(ev is not None and getattr(ev, "enable_kv_cache_events", False))


def model_namespace(vllm_config: VllmConfig, extra: dict[str, Any], layout: dict[str, Any]) -> dict[str, Any]:
    """The kvtier namespace of this engine's KV blocks."""
    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    ns = {
        "model_id": str(mc.model),
        "revision": str(getattr(mc, "revision", None) or ""),
        "layout": layout,
        "tp_rank": int(getattr(pc, "rank", 0) or 0) % max(1, pc.tensor_parallel_size),
        "tp_size": int(pc.tensor_parallel_size),
    }
    if extra.get("salt"):
        ns["salt"] = str(extra["salt"])
    return ns


def config_layout(vllm_config: VllmConfig) -> dict[str, Any]:
    """The block layout vLLM's config implies (checked against the tensors
    on the worker side)."""
    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    dtype = mc.dtype if vllm_config.cache_config.cache_dtype in (None, "auto") else None
    if dtype not in DTYPES:
        raise ValueError(f"kvtier: KV cache dtype {vllm_config.cache_config.cache_dtype!r} is not supported")
    return {
        "num_layers": int(mc.get_num_layers(pc)),
        "kv_heads": int(mc.get_num_kv_heads(pc)),
        "head_dim": int(mc.get_head_size()),
        "block_tokens": int(vllm_config.cache_config.block_size),
        "kind": "kv",
        "dtype": DTYPES[dtype],
    }


# vLLM's documented prefix-caching hashes (``prefix_caching_hash_algo``);
# each makes a block hash of bytes, which is what kvtier keys are made from.
HASH_ALGOS = ("sha256", "sha256_cbor", "xxhash", "xxhash_cbor")


def check_hashing(vllm_config: VllmConfig) -> None:
    """Refuses, at startup, block hashes the connector does not know how
    to key (rather than keying them some other way later)."""
    import os

    algo = getattr(vllm_config.cache_config, "prefix_caching_hash_algo", "sha256")
    if algo not in HASH_ALGOS:
        raise ValueError(
            f"kvtier: prefix_caching_hash_algo {algo!r} is not one kvtier keys blocks by "
            f"(supported: {', '.join(HASH_ALGOS)})"
        )
    if algo.startswith("xxhash") and not os.environ.get("PYTHONHASHSEED"):
        logger.warning(
            "kvtier: %s block hashes are seeded per process unless PYTHONHASHSEED is set: "
            "blocks saved by one engine process are never found by another",
            algo,
        )


def request_keys(ns_id: bytes, block_hashes: Any) -> list[bytes]:
    """kvtier's keys of a run of vLLM block hashes, in one call."""
    return kvtier.keys_from_hashes(ns_id, block_hashes)


class _Staging:
    """Staging memory allocated once and reused: ``slots`` regions of
    ``slot_bytes`` each, pinned when the KV cache is on a GPU (device-to-
    host copies into pageable memory run far below the bus's speed). A
    region is taken whole and given back; nothing here ever waits."""

    def __init__(self, slots: int, slot_bytes: int, pinned: bool):
        self.slot_bytes = slot_bytes
        self._mem = torch.empty(slots * slot_bytes, dtype=torch.uint8, pin_memory=pinned).numpy()
        self._free = list(range(slots))
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            return self._free.pop() if self._free else None

    def give(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def view(self, slot: int, nbytes: int) -> np.ndarray:
        at = slot * self.slot_bytes
        return self._mem[at : at + nbytes]

    def free_slots(self) -> int:
        with self._lock:
            return len(self._free)


@dataclass
class SaveStats:
    """What the worker's save path did (blocks, not calls)."""

    saved: int = 0
    # Not stored because the staging was all in flight (the store is
    # slower than the engine) or the store refused them (throttled, full,
    # down): the engine went on; a later request recomputes them.
    skipped_in_flight: int = 0
    skipped_store: int = 0


class _Saver:
    """Stores copied-out blocks off the engine's step: one background
    thread drains a queue of (keys, staging slot) items. The bound on bytes
    in flight is the staging itself: no free slot, and the save is skipped
    and counted, so a slow or throttled store never blocks a step."""

    def __init__(self, store: Any, staging: _Staging):
        import queue

        self._store = store
        self._staging = staging
        self._queue: queue.Queue = queue.Queue()
        self.stats = SaveStats()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="kvtier-save", daemon=True)
        self._thread.start()

    def submit(self, ns_id: bytes, req_id: str, keys: list[bytes], slot: int, nbytes: int) -> None:
        self._queue.put((ns_id, req_id, keys, slot, nbytes))

    def count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                ns_id, req_id, keys, slot, nbytes = item
                try:
                    self._store.put(ns_id, keys, self._staging.view(slot, nbytes))
                    self.count(saved=len(keys))
                except kvtier.KvTierError as e:
                    self.count(skipped_store=len(keys))
                    logger.warning("kvtier: save of %s skipped: %s", req_id, e)
                except Exception:
                    self.count(skipped_store=len(keys))
                    logger.exception("kvtier: save of %s raised", req_id)
                finally:
                    self._staging.give(slot)
            finally:
                self._queue.task_done()

    def flush(self) -> None:
        """Waits until every queued save is stored or skipped."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


# Staging runs: blocks per slot, default save staging, loading threads.
SLOT_BLOCKS = 32
DEFAULT_STAGING_BYTES = 256 << 20
LOAD_THREADS = 2


@dataclass
class LoadSpec:
    req_id: str
    keys: list[bytes]
    block_ids: list[int]


@dataclass
class SaveSpec:
    req_id: str
    keys: list[bytes]
    block_ids: list[int]


@dataclass
class KvTierMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    saves: list[SaveSpec] = field(default_factory=list)


@dataclass
class _ReqState:
    request: Any
    saved_blocks: int = 0
    block_ids: list[int] = field(default_factory=list)
    # Tokens vLLM had locally when it asked for external ones.
    local_computed: int = 0


class KvTierConnector(KVConnectorBase_V1):
    """See the module docs."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._extra = parse_extra_config(vllm_config.kv_transfer_config.kv_connector_extra_config)
        self._block_size = int(vllm_config.cache_config.block_size)
        self._layout = config_layout(vllm_config)
        self._namespace = model_namespace(vllm_config, self._extra, self._layout)
        check_hashing(vllm_config)
        if role == KVConnectorRole.SCHEDULER and getattr(
            vllm_config.kv_transfer_config, "kv_load_failure_policy", "recompute"
        ) == "fail":
            logger.warning(
                "kvtier: kv_load_failure_policy is 'fail': a kvtier block that cannot be loaded "
                "fails its request; set it to 'recompute' to recompute such blocks instead"
            )
        self._store = open_store(self._extra, worker=role == KVConnectorRole.WORKER)
        self._ns_id: bytes | None = None
        self._register_namespace()
        # Scheduler side.
        self._events_on = role == KVConnectorRole.SCHEDULER and _events_wanted(vllm_config, self._extra)
        self._events = None
        self._reqs: dict[str, _ReqState] = {}
        self._pending_loads: dict[str, LoadSpec] = {}
        # Worker side.
        self._kv_caches: dict[str, torch.Tensor] = {}
        self._layer_names: list[str] = []
        self._direct = False
        self._device = "cpu"
        self._load_errors: set[int] = set()
        self._errors_lock = threading.Lock()
        self._loads_in_flight: dict[str, Any] = {}
        self._pool = None
        self._save_staging: _Staging | None = None
        self._load_staging: _Staging | None = None
        self._saver: _Saver | None = None
        # Embedded with a host tier: blocks move straight between the KV
        # tensors and the tier's memory, one copy, no staging.
        self._direct_store = False

    # ---------------------------------------------------------------- common

    def _register_namespace(self) -> bool:
        if self._ns_id is not None:
            return True
        try:
            self._ns_id = self._store.register_namespace(self._namespace)
            return True
        except kvtier.UnavailableError as e:
            logger.warning("kvtier: daemon unavailable, serving without the cache: %s", e)
            return False
        except kvtier.ThrottledError as e:
            # Registered on a later call: the step goes on without the cache.
            logger.warning("kvtier: daemon throttled, serving without the cache for now: %s", e)
            return False

    def _remember(self, keys: list[bytes], request: Any, first: int) -> None:
        """Tier events: blocks being saved or loaded, for the router."""
        if not self._events_on or self._ns_id is None:
            return
        if self._events is None:
            from kvtier.vllm_events import TierEvents

            self._events = TierEvents(
                self._store,
                self._ns_id,
                self._block_size,
                self._extra["tier_events_max_blocks"],
                namespace=self._namespace,
            )
        try:
            self._events.remember(keys, request, first)
        except Exception as e:  # noqa: BLE001 - events never stop serving
            logger.warning("kvtier: tier events for %s skipped: %s", request.request_id, e)

    def take_events(self):
        """kvtier's tier events (see kvtier.vllm_events) for vLLM's KV event
        publisher."""
        return self._events.take() if self._events is not None else ()

    def _keys(self, request: Any, first: int, last: int) -> list[bytes]:
        assert self._ns_id is not None
        return request_keys(self._ns_id, request.block_hashes[first:last])

    # --------------------------------------------------------- scheduler side

    def on_new_request(self, request: Request) -> None:
        self._reqs[request.request_id] = _ReqState(request)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        state = self._reqs.setdefault(request.request_id, _ReqState(request))
        state.local_computed = num_computed_tokens
        if not self._register_namespace():
            return 0, False
        # Never the last prompt token: vLLM must compute at least one.
        full = min(len(request.block_hashes), (request.num_prompt_tokens - 1) // self._block_size)
        first = num_computed_tokens // self._block_size
        if full <= first:
            return 0, False
        try:
            hit, _ = self._store.lookup(self._ns_id, self._keys(request, 0, full))
        except kvtier.KvTierError as e:
            logger.warning("kvtier: lookup failed, recomputing: %s", e)
            return 0, False
        if hit <= first:
            return 0, False
        return hit * self._block_size - num_computed_tokens, self._extra["load_mode"] == "async"

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int):
        state = self._reqs.setdefault(request.request_id, _ReqState(request))
        if num_external_tokens <= 0:
            return
        # The blocks run from the request's first: local prefix hits, then
        # the ones allocated for the external tokens and beyond.
        block_ids = list(blocks.get_block_ids()[0])
        first = state.local_computed // self._block_size
        n = num_external_tokens // self._block_size
        self._pending_loads[request.request_id] = LoadSpec(
            req_id=request.request_id,
            keys=self._keys(request, first, first + n),
            block_ids=block_ids[first : first + n],
        )
        self._remember(self._pending_loads[request.request_id].keys, request, first)
        # Loaded blocks are in the store already: no need to save them again.
        state.saved_blocks = max(state.saved_blocks, first + n)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KvTierMetadata(loads=list(self._pending_loads.values()))
        self._pending_loads.clear()
        new_tokens = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            state = self._reqs.get(new.req_id)
            if state is None:
                continue
            state.block_ids = list(new.block_ids[0])
            self._plan_save(meta, state, new.num_computed_tokens + new_tokens.get(new.req_id, 0))
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            state = self._reqs.get(req_id)
            if state is None:
                continue
            new_ids = cached.new_block_ids[i]
            if new_ids is not None:
                if req_id in getattr(cached, "resumed_req_ids", ()):
                    state.block_ids = list(new_ids[0])
                else:
                    state.block_ids.extend(new_ids[0])
            self._plan_save(meta, state, cached.num_computed_tokens[i] + new_tokens.get(req_id, 0))
        return meta

    def _plan_save(self, meta: KvTierMetadata, state: _ReqState, computed_after_step: int) -> None:
        """Saves the prompt's blocks that are complete once this step runs."""
        if self._ns_id is None:
            return
        req = state.request
        full = min(computed_after_step, req.num_prompt_tokens) // self._block_size
        full = min(full, len(req.block_hashes), len(state.block_ids))
        if full <= state.saved_blocks:
            return
        first = state.saved_blocks
        keys = self._keys(req, first, full)
        meta.saves.append(SaveSpec(req.request_id, keys, list(state.block_ids[first:full])))
        state.saved_blocks = full
        self._remember(keys, req, first)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        # Saves complete within wait_for_save: nothing holds the blocks after.
        self._reqs.pop(request.request_id, None)
        return False, None

    # ------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]):
        """Detects the layout from the tensors and refuses one it does not
        understand, here, at startup, rather than misreading KV later.

        Understood, per layer: vLLM's (0.31 to 0.34) ``(num_blocks, kv_heads,
        block_size, 2 * head_dim)`` (K then V in the last dimension; often a
        strided view of one shared buffer). kvtier stores each layer's block
        token-major, ``(block_size, kv_heads, 2 * head_dim)``, whatever the
        memory order, so engines with different KV layouts share blocks."""
        if not kv_caches:
            raise ValueError("kvtier: no KV cache tensors to register")
        want = self._layout
        shapes = {tuple(t.shape) for t in kv_caches.values()}
        dtypes = {t.dtype for t in kv_caches.values()}
        if len(shapes) != 1 or len(dtypes) != 1:
            raise ValueError(f"kvtier: KV cache layers differ: shapes {sorted(shapes)}, dtypes {sorted(map(str, dtypes))}")
        (shape,), (dtype,) = shapes, dtypes
        bt, h, d = want["block_tokens"], want["kv_heads"], want["head_dim"]
        if len(shape) != 4 or shape[1:] != (h, bt, 2 * d):
            raise ValueError(
                f"kvtier: KV cache layout {tuple(shape)} is not understood; expected "
                f"(num_blocks, {h}, {bt}, {2 * d}), vLLM's (blocks, kv heads, tokens, K|V)"
            )
        if DTYPES.get(dtype) != want["dtype"] or len(kv_caches) != want["num_layers"]:
            raise ValueError(
                f"kvtier: {len(kv_caches)} layers of {dtype} do not match the model's "
                f"{want['num_layers']} layers of {want['dtype']}"
            )
        self._kv_caches = dict(kv_caches)
        self._layer_names = list(kv_caches)
        # The fast path: each block's memory already token-major and dense,
        # so blocks move with one copy per (layer, block run) in Rust, on the
        # tensors' device (host memcpy, or CUDA async copies on a stream).
        first = next(iter(kv_caches.values()))
        self._direct = all(
            t[0].permute(1, 0, 2).is_contiguous() and t.stride(0) >= t[0].numel() for t in kv_caches.values()
        )
        self._device = "cpu" if first.device.type == "cpu" else f"cuda:{first.device.index or 0}"
        self._direct_store = (
            self._direct
            and self._extra["mode"] == "embedded"
            and hasattr(self._store, "save_blocks")
            and self._store.has_host_tier()
        )
        # Staging, allocated once: saves take a slot per run of up to
        # SLOT_BLOCKS blocks and hold it until the store has them; loads
        # use one slot per loading thread.
        slot_bytes = SLOT_BLOCKS * self._block_bytes()
        pinned = first.device.type == "cuda"
        if not self._direct_store:
            slots = max(2, self._extra.get("staging_bytes", DEFAULT_STAGING_BYTES) // slot_bytes)
            self._save_staging = _Staging(slots, slot_bytes, pinned)
            self._saver = _Saver(self._store, self._save_staging)
            self._load_staging = _Staging(LOAD_THREADS + 1, slot_bytes, pinned)
        else:
            self._saver = _Saver(self._store, _Staging(0, slot_bytes, False))
        logger.info(
            "kvtier: %d layers of %s, %s path on %s",
            len(self._layer_names),
            tuple(shape),
            "direct" if self._direct else "permuting",
            self._device,
        )

    def _copy(self, direction: str, block_ids: list[int], staging: np.ndarray) -> None:
        """Moves whole blocks between the KV tensors and block-major staging."""
        if self._direct:
            kvtier._kvtier._copy_blocks(
                direction, self._layers(), self._layer_block_bytes(), list(block_ids), staging, self._device
            )
            return
        per_layer = self._layer_block_bytes()
        block_bytes = per_layer * len(self._layer_names)
        buf = torch.from_numpy(staging)
        for i, block_id in enumerate(block_ids):
            for li, name in enumerate(self._layer_names):
                layer = self._kv_caches[name]
                view = self._block_view(layer, block_id).permute(1, 0, 2)  # token-major
                part = buf[i * block_bytes + li * per_layer : i * block_bytes + (li + 1) * per_layer]
                if direction == "save":
                    part.copy_(view.contiguous().view(-1).view(torch.uint8))
                else:
                    view.copy_(part.view(layer.dtype).view(view.shape))

    def _block_bytes(self) -> int:
        return len(self._layer_names) * self._layer_block_bytes()

    def _layer_block_bytes(self) -> int:
        t = self._kv_caches[self._layer_names[0]]
        return self._block_view(t, 0).numel() * t.element_size()

    def _block_view(self, layer: torch.Tensor, block_id: int) -> torch.Tensor:
        """One block of one layer, (kv_heads, block_size, 2 * head_dim), a view."""
        return layer[block_id]

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvTierMetadata) or not meta.loads:
            return
        if not self._register_namespace():
            with self._errors_lock:
                self._load_errors.update(b for load in meta.loads for b in load.block_ids)
            if self._extra["load_mode"] == "async":
                # Async loads must still be reported finished, failed or not.
                self._loads_in_flight.update({load.req_id: None for load in meta.loads})
            return
        if self._extra["load_mode"] == "sync":
            for load in meta.loads:
                self._load_or_fail(load)
            return
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=LOAD_THREADS, thread_name_prefix="kvtier-load")
        for load in meta.loads:
            # The request's blocks are its own until the load is reported
            # finished: writing them from another thread is safe.
            self._loads_in_flight[load.req_id] = self._pool.submit(self._load_or_fail, load)

    def _load_or_fail(self, load: LoadSpec) -> None:
        """A load that raises reports every block it did not finish as
        failed, so nothing half-written is taken for KV."""
        done = [0]
        try:
            self._load(load, done)
        except Exception:
            logger.exception("kvtier: load of %s raised; vLLM recomputes its blocks", load.req_id)
            with self._errors_lock:
                self._load_errors.update(load.block_ids[done[0] :])

    def _layers(self) -> list[tuple[int, int, int]]:
        out = []
        for name in self._layer_names:
            t = self._kv_caches[name]
            out.append((t.data_ptr(), t.stride(0) * t.element_size(), t.shape[0]))
        return out

    def _load(self, load: LoadSpec, done: list[int]) -> None:
        """Reads a request's blocks into the KV tensors; records the blocks
        it could not load (before it returns, so they are reported no later
        than the load's completion). `done[0]`: blocks written so far."""
        loaded, failed = 0, None
        try:
            if self._direct_store:
                loaded, failed = self._store.load_blocks(
                    self._ns_id, load.keys, self._layers(), self._layer_block_bytes(), load.block_ids, self._device
                )
                done[0] = loaded
            else:
                loaded, failed = self._load_staged(load, done)
        except kvtier.KvTierError as e:
            logger.warning("kvtier: load of %s failed, recomputing: %s", load.req_id, e)
            loaded = done[0]
        if loaded < len(load.keys):
            with self._errors_lock:
                self._load_errors.update(load.block_ids[loaded:])
            logger.warning(
                "kvtier: %s loaded %d of %d blocks%s; vLLM recomputes the rest",
                load.req_id,
                loaded,
                len(load.keys),
                " (a block failed verification)" if failed is not None else "",
            )

    def _load_staged(self, load: LoadSpec, done: list[int]) -> tuple[int, int | None]:
        """Through a staging slot, SLOT_BLOCKS blocks at a time."""
        assert self._load_staging is not None
        slot = self._load_staging.take()
        if slot is None:
            raise RuntimeError("kvtier: no load staging slot free (more loading threads than slots)")
        try:
            block_bytes = self._block_bytes()
            for at in range(0, len(load.keys), SLOT_BLOCKS):
                keys = load.keys[at : at + SLOT_BLOCKS]
                staging = self._load_staging.view(slot, len(keys) * block_bytes)
                n, failed = self._store.get(self._ns_id, keys, staging)
                if n:
                    self._copy("load", load.block_ids[at : at + n], staging[: n * block_bytes])
                done[0] = at + n
                if n < len(keys):
                    return at + n, (None if failed is None else at + failed)
            return len(load.keys), None
        finally:
            self._load_staging.give(slot)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads complete in start_load_kv.
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        # Blocks are saved whole, across all layers, in wait_for_save, from
        # the registered tensors (kv_layer is one of them).
        return

    def wait_for_save(self):
        """The step pays one copy of each completed block out of the KV
        tensors (into the host tier itself, embedded; into pinned staging
        otherwise); the store runs on the saver's thread. When the copy
        returns the blocks are free to reuse, so request_finished never
        holds them."""
        meta = self._get_connector_metadata()
        if not isinstance(meta, KvTierMetadata) or not meta.saves or not self._register_namespace():
            return
        for save in meta.saves:
            self._save(save)

    def _save(self, save: SaveSpec) -> None:
        assert self._saver is not None
        if self._direct_store:
            try:
                r = self._store.save_blocks(
                    self._ns_id, save.keys, self._layers(), self._layer_block_bytes(), save.block_ids, self._device
                )
                self._saver.count(saved=r["stored"], skipped_store=r["not_admitted"])
            except kvtier.KvTierError as e:
                self._saver.count(skipped_store=len(save.keys))
                logger.warning("kvtier: save of %s skipped: %s", save.req_id, e)
            return
        assert self._save_staging is not None
        block_bytes = self._block_bytes()
        for at in range(0, len(save.keys), SLOT_BLOCKS):
            slot = self._save_staging.take()
            if slot is None:
                # Everything in flight: skip the rest of this save (a
                # prefix's later blocks are no use without the earlier).
                self._saver.count(skipped_in_flight=len(save.keys) - at)
                logger.debug("kvtier: save of %s skipped from block %d: staging in flight", save.req_id, at)
                return
            keys = save.keys[at : at + SLOT_BLOCKS]
            nbytes = len(keys) * block_bytes
            try:
                self._copy("save", save.block_ids[at : at + SLOT_BLOCKS], self._save_staging.view(slot, nbytes))
            except Exception:
                self._save_staging.give(slot)
                self._saver.count(skipped_store=len(save.keys) - at)
                logger.exception("kvtier: copy-out for the save of %s failed", save.req_id)
                return
            self._saver.submit(self._ns_id, save.req_id, keys, slot, nbytes)

    @property
    def save_stats(self) -> SaveStats:
        """Blocks saved and skipped by this worker so far."""
        return SaveStats() if self._saver is None else self._saver.stats

    def flush_saves(self) -> None:
        """Waits until every save copied out so far is stored or skipped."""
        if self._saver is not None:
            self._saver.flush()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Async loads that completed (their errors are recorded already)."""
        done = {r for r, f in self._loads_in_flight.items() if f is None or f.done()}
        for r in done:
            f = self._loads_in_flight.pop(r)
            if f is not None and f.exception() is not None:
                logger.warning("kvtier: load of %s raised: %s", r, f.exception())
        return None, (done or None)

    def shutdown(self):
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self._saver is not None:
            # Saves copied out are stored before the engine exits.
            self._saver.flush()
            self._saver.close()
            logger.info("kvtier: saves %s", self._saver.stats)
            self._saver = None

    def get_block_ids_with_load_errors(self) -> set[int]:
        with self._errors_lock:
            errors, self._load_errors = self._load_errors, set()
        return errors
