"""kvtier as a remote-storage plugin of in-process LMCache (``LMCacheEngine``,
vLLM's ``LMCacheConnectorV1``), tested with LMCache 0.5.6.

Users name the classes through ``kvtier.lmcache`` (``KvTierConnectorAdapter``,
``KvTierConnector``), which imports this module, and with it lmcache and
torch, only when one of them is used.

How LMCache loads it: ``remote_storage_plugins: ["kvtier"]`` makes a
``RemoteBackend`` for the URL ``plugin://kvtier``, and
``extra_config["remote_storage_plugin.kvtier.module_path" / ".class_name"]``
name the class. ``KvTierConnectorAdapter`` is a ``ConnectorAdapter``: LMCache
hands it the engine's metadata, also in the scheduler role, where a bare
``RemoteConnector`` (``KvTierConnector`` named directly) gets none. Options
come from ``extra_config["remote_storage_plugin.<name>.<option>"]`` (see
``OPTIONS``).

Why it is built this way:

- **Nothing blocks LMCache's event loop.** Every call is one batch of
  ``kvtier._kvtier.LmcacheRemote`` (``KvTierL2`` underneath): it returns a
  future id at once, runs on kvtier's threads without the interpreter, and
  signals an eventfd the loop watches (``add_reader``); the reader drains the
  completions and resolves the waiting futures. The synchronous calls
  (``exists_sync``, ``batched_contains``, ``remove_sync``) wait on the same
  eventfd themselves, so they also work when called on the loop's thread.
- **Keys.** ``CacheEngineKey`` (model, world size, worker id, chunk hash,
  dtype, tags) maps to an object key of the L2: model, world size and dtype
  form its model field (``"{model}|{world_size}|{dtype}"``), the worker id
  its KV rank, the tags its salt (``k=v`` pairs, percent-encoded, joined by
  ``&``, in the key's order), so each combination is a kvtier namespace of its
  own and another model, dtype or tenant never matches. The chunk hash is
  the block key, derived reversibly (see ``python/src/l2/remote.rs``), so
  ``list()`` reads the keys back from kvtier, also after a restart of
  either side. Hashes are ints in [-2^63, 2^64), what LMCache 0.5.6 makes
  (Python's ``hash``, or a digest's first 8 bytes); another hash, a model
  name with ``@``, or a per-layer key (``use_layerwise``) is refused with a
  ``ValueError`` that says which.
- **Chunks in the engine's layout.** An object is stored as its bytes (with
  kvtier's header: magic, version, length; kvtier checksums the block). A
  ``get`` allocates a full chunk from LMCache's CPU backend, kvtier fills its
  front and says the length, and a shorter last chunk of a prompt is cut
  down to its tokens (LMCache's own ``reshape_partial_chunk``), so shapes
  round-trip without storing them. Only objects in the engine's layout are
  accepted (``remote_serde: naive``; a shape with fewer tokens for the last
  chunk): another layout is refused at ``put``.
- **Faults are misses.** A chunk kvtier cannot produce whole (kvtierd down
  or unreachable, a checksum mismatch, a length that does not fit) is
  ``None`` from ``get`` and ``False`` from ``exists``; the buffer allocated
  for it goes back to LMCache, but only once kvtier has let go of it (a get
  LMCache cancels after its timeout keeps its buffer until the batch ends).
  A failed ``put`` raises, which LMCache logs; each chunk is stored whole
  or not at all.
"""

import asyncio
import concurrent.futures
import select
import struct
import threading
from typing import Any, Optional
from urllib.parse import quote, unquote

from lmcache.logging import init_logger
from lmcache.utils import TORCH_DTYPE_TO_STR_DTYPE, CacheEngineKey, LayerCacheEngineKey
from lmcache.v1.storage_backend.connector import ConnectorAdapter, ConnectorContext, extract_plugin_type
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

from kvtier._kvtier import KvTierError, LmcacheRemote

logger = init_logger(__name__)

PLUGIN_TYPE = "kvtier"

# extra_config["remote_storage_plugin.<name>.<option>"]: the option, the
# types it takes, and what it is.
OPTIONS = {
    "endpoint": (str, "a local kvtierd, http://host:port"),
    "token": (str, "kvtierd's bearer token"),
    "timeout_s": ((int, float), "bound on each kvtierd call (default 30)"),
    "shm_dir": ((str, type(None)), "kvtierd's shm_dir for the shared-memory path (default /dev/shm; null: the socket)"),
    "disk_dir": (str, "instead of endpoint: an SSD-only store in this process"),
    "disk_capacity_bytes": (int, "that store's budget (default 64 GiB)"),
    "store": (dict, "instead: a full embedded store config (deploy/kvtier.toml's keys)"),
    "io_threads": (int, "threads that run the batches (default 4)"),
    "list_max_keys": (int, "the most keys list() returns (default 65536)"),
}
DEFAULT_LIST_MAX_KEYS = 65536
# Keys of LMCache's own loader in the same table.
_LOADER_KEYS = ("module_path", "class_name")

_HASH_MIN = -(1 << 63)
_HASH_MAX = (1 << 64) - 1


def plugin_options(config: Any, plugin_name: str) -> dict:
    """The kvtier options of plugin ``plugin_name`` in ``config.extra_config``;
    an unknown option or a wrong type is a ``ValueError`` naming it."""
    prefix = f"remote_storage_plugin.{plugin_name}."
    out = {}
    for k, v in (getattr(config, "extra_config", None) or {}).items():
        if not isinstance(k, str) or not k.startswith(prefix):
            continue
        name = k[len(prefix):]
        if name in _LOADER_KEYS:
            continue
        if name not in OPTIONS:
            raise ValueError(f"extra_config {k!r}: kvtier takes {', '.join(prefix + o for o in OPTIONS)}")
        types, _ = OPTIONS[name]
        if isinstance(v, bool) or not isinstance(v, types):
            raise ValueError(f"extra_config {k!r} = {v!r}: expected {types}")
        out[name] = v
    return out


def _own_plugin_name(config: Any, cls: type) -> str:
    """The plugin name a bare ``KvTierConnector`` was configured under
    (LMCache's ``DynamicConnectorAdapter`` does not pass it)."""
    extra = getattr(config, "extra_config", None) or {}
    names = [
        n for n in (getattr(config, "remote_storage_plugins", None) or [])
        if extra.get(f"remote_storage_plugin.{n}.class_name") == cls.__name__
    ]
    if len(names) > 1:
        raise ValueError(
            f"{cls.__name__} is configured as plugins {names}; a bare connector cannot tell which it is: "
            "use class_name KvTierConnectorAdapter, which LMCache tells its plugin name"
        )
    return names[0] if names else PLUGIN_TYPE


def _salt(tags: Optional[tuple]) -> Optional[str]:
    if not tags:
        return None
    return "&".join(f"{quote(str(k), safe='')}={quote(str(v), safe='')}" for k, v in tags)


def object_key(key: CacheEngineKey) -> str:
    """The L2 object key of an LMCache chunk key (see the module docs), or a
    ``ValueError`` that says why it has none."""
    if isinstance(key, LayerCacheEngineKey):
        raise ValueError(f"{key.to_string()}: per-layer keys (use_layerwise) are not supported by kvtier")
    model = key.model_name
    if not isinstance(model, str) or not model or "@" in model:
        raise ValueError(f"model name {model!r}: kvtier takes a non-empty name without '@'")
    ws, worker, h = key.world_size, key.worker_id, key.chunk_hash
    if not isinstance(ws, int) or isinstance(ws, bool) or ws < 1:
        raise ValueError(f"world size {ws!r}: a positive int")
    if not isinstance(worker, int) or isinstance(worker, bool) or not 0 <= worker < (1 << 32):
        raise ValueError(f"worker id {worker!r}: an int in [0, 2^32)")
    if not isinstance(h, int) or isinstance(h, bool) or not _HASH_MIN <= h <= _HASH_MAX:
        raise ValueError(
            f"chunk hash {h!r}: kvtier takes ints in [-2^63, 2^64), what LMCache's hashes are"
        )
    dtype = TORCH_DTYPE_TO_STR_DTYPE.get(key.dtype)
    if dtype is None:
        raise ValueError(f"dtype {key.dtype}: not one LMCache names")
    s = f"{model}|{ws}|{dtype}@{worker:08x}@0@{h.to_bytes(9, 'big', signed=True).hex()}"
    salt = _salt(key.tags)
    return s if salt is None else f"{s}@{salt}"


def key_string(scope: str, salt: Optional[str], hash9: bytes) -> Optional[str]:
    """``CacheEngineKey.to_string()`` of a chunk kvtier listed, or None if
    the namespace is not one ``object_key`` makes."""
    try:
        head, rank, group = scope.rsplit("@", 2)
        model, ws, dtype = head.rsplit("|", 2)
        if group != "0":
            return None
        s = f"{model}@{int(ws)}@{int(rank, 16)}@{int.from_bytes(hash9, 'big', signed=True):x}@{dtype}"
        if salt:
            s += "@" + "@".join(f"{unquote(k)}%{unquote(v)}" for k, v in (p.split("=", 1) for p in salt.split("&")))
        return s
    except ValueError:
        return None


class _Job:
    """A batch in flight: the future its completion resolves, and the
    memory objects kvtier holds (one reference each) until then."""

    __slots__ = ("future", "hold")

    def __init__(self, hold):
        self.future = concurrent.futures.Future()
        self.hold = hold


class KvTierConnector(RemoteConnector):
    """kvtier as LMCache's remote connector (see the module docs)."""

    def __init__(self, loop, local_cpu_backend, config, metadata=None, plugin_name=None):
        if metadata is None:
            # Loaded bare, through LMCache's DynamicConnectorAdapter: it
            # passes no metadata; the CPU backend has it (as for FSConnector).
            metadata = getattr(local_cpu_backend, "metadata", None)
            if metadata is None:
                raise ValueError(
                    "KvTierConnector got no engine metadata (the scheduler role?): "
                    "configure class_name KvTierConnectorAdapter"
                )
        if config is None:
            config = local_cpu_backend.config
        if plugin_name is None:
            plugin_name = _own_plugin_name(config, type(self))
        super().__init__(config, metadata)
        if getattr(config, "use_layerwise", False):
            raise ValueError("kvtier stores whole chunks: use_layerwise is not supported")
        serde = getattr(config, "remote_serde", None) or "naive"
        if serde != "naive":
            raise ValueError(f"remote_serde {serde!r}: kvtier stores chunks in the engine's layout (naive)")
        options = plugin_options(config, plugin_name)
        self._list_max = options.pop("list_max_keys", DEFAULT_LIST_MAX_KEYS)
        if not 1 <= self._list_max <= 1 << 24:
            raise ValueError(f"list_max_keys {self._list_max}: 1 to 2^24")
        self._plugin_name = plugin_name
        self._metadata = metadata
        self._loop = loop
        self._cpu = local_cpu_backend
        self._timeout_s = float(getattr(config, "blocking_timeout_secs", 10) or 10)
        self._l2 = LmcacheRemote(chunk_bytes=self.full_chunk_size_bytes, **options)
        self._fd = self._l2.event_fd()
        self._lock = threading.Lock()
        self._pending: dict[int, _Job] = {}
        self._closed = False
        # This object's own namespace (no tags): registered before a
        # listing, so an embedded store that restarted lists it too.
        self._probe = object_key(CacheEngineKey(
            metadata.model_name, metadata.world_size, metadata.worker_id, 0, metadata.kv_dtype
        ))
        loop.call_soon_threadsafe(self._watch)
        logger.info(
            "kvtier remote connector %s: %s, chunks of %d bytes", plugin_name,
            options.get("endpoint") or options.get("disk_dir") or "embedded store", self.full_chunk_size_bytes,
        )

    def __repr__(self) -> str:
        return f"<KvTierConnector {self._plugin_name}>"

    # -- batches and their completions ------------------------------------

    def _watch(self):
        if not self._closed:
            self._loop.add_reader(self._fd, self._drain)

    def _drain(self):
        """Takes the completed batches and finishes their jobs; any thread."""
        with self._lock:
            done = self._l2.drain_completions()
            jobs = [(self._pending.pop(fid, None), ok, error, per_key) for fid, ok, error, per_key in done]
        for job, ok, error, per_key in jobs:
            if job is None:
                continue
            for obj in job.hold:
                obj.ref_count_down()
            try:
                job.future.set_result((ok, error, per_key or []))
            except concurrent.futures.InvalidStateError:
                pass  # its waiter was cancelled

    def _submit(self, submit, hold=()):
        """Runs ``submit`` (a call of the L2 that returns a future id) and
        tracks its batch; ``hold`` are the memory objects the batch uses."""
        for obj in hold:
            obj.ref_count_up()
        job = _Job(hold)
        try:
            with self._lock:
                self._pending[submit()] = job
        except BaseException:
            for obj in hold:
                obj.ref_count_down()
            raise
        return job

    async def _wait(self, job):
        return await asyncio.wrap_future(job.future)

    def _wait_sync(self, job):
        """Waits for a batch from any thread (the loop's too) by draining
        the eventfd itself; None when it takes longer than LMCache's
        blocking timeout."""
        deadline = self._loop.time() + self._timeout_s
        p = select.poll()
        p.register(self._fd, select.POLLIN)
        while not job.future.done():
            left = deadline - self._loop.time()
            if left <= 0:
                return None
            p.poll(min(left, 0.05) * 1000)
            self._drain()
        return job.future.result()

    def _keys(self, keys):
        """Object keys, None where a key has none (logged)."""
        out = []
        for k in keys:
            try:
                out.append(object_key(k))
            except ValueError as e:
                logger.warning("kvtier: %s", e)
                out.append(None)
        return out

    # -- layout ------------------------------------------------------------

    def _layout_error(self, obj) -> Optional[str]:
        """Why ``obj`` is not a chunk in the engine's layout, or None."""
        fmt = obj.get_memory_format()
        if fmt != self.meta_fmt:
            return f"memory format {fmt}; kvtier stores {self.meta_fmt} chunks (remote_serde naive)"
        shapes, dtypes = list(obj.get_shapes()), list(obj.get_dtypes())
        if dtypes != list(self.meta_dtypes):
            return f"dtypes {dtypes}; the engine's are {list(self.meta_dtypes)}"
        full = list(self.meta_shapes)
        if shapes == full:
            want = self.full_chunk_size_bytes
        elif (
            len(shapes) == 1 and len(full) == 1 and len(shapes[0]) == 4 and len(full[0]) == 4
            and shapes[0][:2] == full[0][:2] and shapes[0][3] == full[0][3] and 0 < shapes[0][2] < full[0][2]
        ):
            want = shapes[0][2] * self.single_token_size
        else:
            return f"shapes {shapes}; the engine's chunk is {full} (fewer tokens for a last chunk)"
        size = obj.byte_array.nbytes
        if size != want:
            return f"{size} bytes for shapes {shapes}; {want} expected"
        return None

    # -- RemoteConnector ---------------------------------------------------

    async def exists(self, key: CacheEngineKey) -> bool:
        return (await self._exists([key]))[0]

    def exists_sync(self, key: CacheEngineKey) -> bool:
        return self._exists_sync([key])[0]

    def _exists_job(self, keys):
        okeys = self._keys(keys)
        asked = [k for k in okeys if k is not None]
        if not asked or self._closed:
            return okeys, None
        try:
            return okeys, self._submit(lambda: self._l2.submit_batch_exists(asked))
        except KvTierError as e:
            logger.warning("kvtier exists: %s", e)
            return okeys, None

    @staticmethod
    def _hits(okeys, result):
        """Per key, found; a failed part of the batch is a miss."""
        found = iter(result[2] if result is not None else [])
        return [False if k is None else bool(next(found, False)) for k in okeys]

    async def _exists(self, keys):
        okeys, job = self._exists_job(keys)
        return self._hits(okeys, None if job is None else await self._wait(job))

    def _exists_sync(self, keys):
        okeys, job = self._exists_job(keys)
        return self._hits(okeys, None if job is None else self._wait_sync(job))

    def support_batched_async_contains(self) -> bool:
        return True

    async def batched_async_contains(self, lookup_id: str, keys: list, pin: bool = False) -> int:
        return _leading(await self._exists(keys))

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: list) -> int:
        return _leading(self._exists_sync(keys))

    async def put(self, key: CacheEngineKey, memory_obj) -> None:
        await self.batched_put([key], [memory_obj])

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: list, memory_objs: list) -> None:
        """Stores each chunk; raises (and stores nothing) for a key or an
        object kvtier does not take, raises after a batch that failed."""
        if len(keys) != len(memory_objs):
            raise ValueError(f"{len(keys)} keys and {len(memory_objs)} objects")
        okeys = [object_key(k) for k in keys]
        for k, obj in zip(keys, memory_objs):
            why = self._layout_error(obj)
            if why is not None:
                raise ValueError(f"{k.to_string()}: {why}")
        if not okeys:
            return
        bufs = [obj.byte_array for obj in memory_objs]
        job = self._submit(lambda: self._l2.submit_batch_set(okeys, bufs), hold=list(memory_objs))
        ok, error, per_key = await self._wait(job)
        if not ok:
            raise KvTierError(f"kvtier stored {sum(map(bool, per_key))} of {len(okeys)} chunks: {error}")

    async def get(self, key: CacheEngineKey):
        return (await self.batched_get([key]))[0]

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: list) -> list:
        """Each chunk, or None: a miss, a chunk kvtier cannot give whole, an
        object that does not fit the engine's layout, or no CPU memory."""
        out: list = [None] * len(keys)
        okeys = self._keys(keys)
        objs = {}
        for i, k in enumerate(okeys):
            if k is None or self._closed:
                continue
            # Never a busy loop here: on LMCache's event loop it would
            # stall everything, so no memory now is a miss.
            obj = self._cpu.allocate(self.meta_shapes, self.meta_dtypes, self.meta_fmt, busy_loop=False)
            if obj is None:
                logger.debug("kvtier get: no CPU memory for %s", keys[i])
                continue
            objs[i] = obj
        if not objs:
            return out
        sel = list(objs)
        lengths = bytearray(8 * len(sel))
        try:
            job = self._submit(
                lambda: self._l2.submit_batch_get(
                    [okeys[i] for i in sel], [objs[i].byte_array for i in sel], lengths
                ),
                hold=[objs[i] for i in sel],
            )
            ok, error, per_key = await self._wait(job)
        except BaseException as e:
            # Cancelled (LMCache's timeout), or the L2 is closed: the batch
            # keeps its own references until it ends.
            for obj in objs.values():
                obj.ref_count_down()
            if isinstance(e, KvTierError):
                logger.warning("kvtier get: %s", e)
                return out
            raise
        if not ok:
            logger.warning("kvtier get: %s", error)
        lens = struct.unpack_from(f"<{len(sel)}Q", lengths)
        for j, i in enumerate(sel):
            obj = objs[i]
            if j < len(per_key) and per_key[j]:
                try:
                    out[i] = self.reshape_partial_chunk(obj, lens[j])
                    continue
                except ValueError as e:
                    logger.warning("kvtier get %s: %s", keys[i].to_string(), e)
            obj.ref_count_down()
        return out

    async def batched_get_non_blocking(self, lookup_id: str, keys: list) -> list:
        got = await self.batched_get(keys)
        n = next((i for i, o in enumerate(got) if o is None), len(got))
        for o in got[n:]:
            if o is not None:
                o.ref_count_down()
        return got[:n]

    def remove_sync(self, key: CacheEngineKey) -> bool:
        (k,) = self._keys([key])
        if k is None or self._closed:
            return False
        try:
            job = self._submit(lambda: self._l2.submit_batch_delete([k]))
        except KvTierError as e:
            logger.warning("kvtier remove: %s", e)
            return False
        r = self._wait_sync(job)
        return bool(r and r[2] and r[2][0])

    async def list(self) -> list:
        """The keys (``CacheEngineKey.to_string()``) of the chunks kvtier
        holds for this connector's model: every world size, worker, dtype
        and tag set of it, at most ``list_max_keys`` (a warning says when
        more were left out). Through kvtierd: what its own tiers (host, SSD)
        hold, namespaces persisted across restarts; embedded: the namespaces
        used since the store opened, and this worker's own."""
        listed, truncated = await self._loop.run_in_executor(
            None, self._l2.list_objects, f"{self._metadata.model_name}|", self._list_max, [self._probe]
        )
        out = []
        for scope, salt, h in listed:
            s = key_string(scope, salt, h)
            if s is not None and s.split("@", 1)[0] == self._metadata.model_name:
                out.append(s)
        if truncated:
            logger.warning("kvtier list: more than %d chunks; listed the first %d", self._list_max, len(out))
        return out

    def support_ping(self) -> bool:
        return True

    async def ping(self) -> int:
        """0 when kvtier answers a lookup in this worker's namespace."""
        if self._closed:
            return 1
        try:
            job = self._submit(lambda: self._l2.submit_batch_exists([self._probe]))
        except KvTierError:
            return 1
        ok, _, _ = await self._wait(job)
        return 0 if ok else 1

    async def close(self) -> None:
        """Finishes the batches submitted and lets the store go. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        await self._loop.run_in_executor(None, self._l2.close)
        self._drain()

    def stats(self):
        """Chunks stored, loaded, missed and failed since start."""
        return self._l2.stats()


def _leading(hits: list) -> int:
    return next((i for i, h in enumerate(hits) if not h), len(hits))


class KvTierConnectorAdapter(ConnectorAdapter):
    """What ``remote_storage_plugin.<name>.class_name`` names: LMCache makes
    one with no arguments and asks it for the connector of
    ``plugin://kvtier`` (or ``plugin://kvtier.<instance>``), with the
    engine's metadata, in every role."""

    def __init__(self) -> None:
        super().__init__(f"plugin://{PLUGIN_TYPE}")

    def can_parse(self, url: str) -> bool:
        return url.startswith("plugin://") and extract_plugin_type(url[len("plugin://"):]) == PLUGIN_TYPE

    def create_connector(self, context: ConnectorContext) -> RemoteConnector:
        return KvTierConnector(
            loop=context.loop,
            local_cpu_backend=context.local_cpu_backend,
            config=context.config,
            metadata=context.metadata,
            plugin_name=context.plugin_name or context.url[len("plugin://"):],
        )
