"""kvtier as a secondary tier of vLLM's own KV offloading:
``KvTierSecondaryTier(SecondaryTierManager)``.

vLLM's ``OffloadingConnector`` with ``TieringOffloadingSpec`` keeps a CPU
primary tier (the GPU's only peer) and cascades every chunk it stores there to
its secondary tiers; a chunk the CPU tier has lost is promoted back from one.
This module is such a secondary tier: kvtier's SSD, blob and cluster tiers
behind vLLM's CPU tier. Enable it with::

    --kv-transfer-config '{"kv_connector": "OffloadingConnector",
        "kv_role": "kv_both",
        "kv_connector_extra_config": {
            "spec_name": "TieringOffloadingSpec",
            "cpu_bytes_to_use": 8589934592,
            "secondary_tiers": [{"type": "KvTierSecondaryTier",
                                 "module_path": "kvtier.vllm_tier",
                                 "disk_dir": "/var/lib/kvtier/vllm"}]}}'

Tier config (the keys beside ``type`` and ``module_path``; an unknown key or
a wrong value stops vLLM at startup, naming it):

- ``mode``: ``"embedded"`` (default: a kvtier store in the engine process)
  or ``"daemon"`` (a local kvtierd, which may front a cluster).
- ``disk_dir``, ``disk_capacity_bytes``: the embedded store's SSD tier
  (SSD-only: vLLM's CPU tier is the RAM tier). Default capacity 64 GiB.
- ``store``: a full embedded store config (the keys of deploy/kvtier.toml,
  e.g. a ``blob`` table), instead of ``disk_dir``.
- ``endpoint``, ``token``: the daemon's address and bearer token.
- ``salt``: a namespace salt (e.g. one per tenant).
- ``io_threads``: threads moving chunks (default 4).
- ``max_queued_stores``: store jobs waiting for a thread at most (default
  64); a store beyond it is failed at once, so a slow kvtier never holds
  more of vLLM's CPU tier pinned than that.
- ``max_batch_bytes``: bytes per kvtier call and staging buffer (default
  64 MiB, under kvtierd's 256 MiB ``max_request_bytes``).
- ``locality``: ``"LOCAL"`` or ``"REMOTE"``, vLLM's own tier key.
  (``backpressure`` is vLLM's too: its factory takes it before this tier.)

One kvtier block is one vLLM CPU-tier chunk: the chunk's row of the CPU
tier, every worker's slot and the padding, as vLLM lays it out. kvtier does
not read it; its namespace fingerprints the model and everything vLLM's own
file tier counts as making a chunk incompatible (vLLM's ``FileMapper``
fields: model, dtype, block and chunk sizes, layer names, parallelism,
layout) plus the chunk's size and the salt, so another model's or layout's
chunks never match. The key of a chunk is vLLM's offload key (block hash
and group) in that namespace.

Every transfer runs on this tier's threads, never on the scheduler's: a
submitted job is queued and its result reported by ``get_finished_jobs``.
Lookups go through vLLM's ``AsyncLookupManager`` (a first lookup answers
RETRY and is probed off the scheduler thread, once per step). A store that
fails (kvtier down, throttled, full) is reported failed, and vLLM unpins its
chunks; it is never retried. A load that fails or meets a corrupt block
reports the chunks before it loaded and the rest failed, so vLLM recomputes
them; a chunk that failed verification is never handed to vLLM.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from vllm.v1.kv_offload.base import Locality, LookupResult, Medium, OffloadKey, ReqContext
from vllm.v1.kv_offload.tiering.async_lookup import AsyncLookupManager
from vllm.v1.kv_offload.tiering.base import (
    JobId,
    JobResult,
    RequestOffloadingContext,
    ScheduleEndContext,
    SecondaryTierManager,
    TransferJob,
)

import kvtier

if TYPE_CHECKING:
    from vllm.v1.kv_offload.base import OffloadingSpec
    from vllm.v1.kv_offload.tiering.backpressure import BackpressureDetector

logger = logging.getLogger("kvtier.vllm_tier")

TIER_KEYS = {
    "mode",
    "endpoint",
    "token",
    "disk_dir",
    "disk_capacity_bytes",
    "store",
    "salt",
    "io_threads",
    "max_queued_stores",
    "max_batch_bytes",
    "locality",
}
# kvtier lookups per batch of keys vLLM's lookup thread asks about.
LOOKUPS_PER_BATCH = 16
EMBEDDED_ONLY = ("disk_dir", "disk_capacity_bytes", "store")
DAEMON_ONLY = ("endpoint", "token")


def parse_tier_config(config: dict[str, Any]) -> dict[str, Any]:
    """Checks the tier's config; names the key that is wrong. Returns it
    with defaults filled in."""
    where = "secondary tier KvTierSecondaryTier"
    cfg = dict(config)
    unknown = sorted(set(cfg) - TIER_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(TIER_KEYS))})")
    mode = cfg.setdefault("mode", "embedded")
    if mode not in ("embedded", "daemon"):
        raise ValueError(f"{where}: mode {mode!r} must be 'embedded' or 'daemon'")
    for key, default, least in (
        ("io_threads", 4, 1),
        ("max_queued_stores", 64, 1),
        ("max_batch_bytes", 64 << 20, 1),
        ("disk_capacity_bytes", 64 << 30, 1),
    ):
        value = cfg.setdefault(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{where}: {key} must be an integer >= {least}, not {value!r}")
    for key in ("endpoint", "token", "disk_dir", "salt"):
        if key in cfg and not isinstance(cfg[key], str):
            raise ValueError(f"{where}: {key} must be a string, not {cfg[key]!r}")
    if "store" in cfg and not isinstance(cfg["store"], dict):
        raise ValueError(f"{where}: store must be a table of store settings (deploy/kvtier.toml), not {cfg['store']!r}")
    if cfg.get("locality") is not None:
        try:
            Locality(cfg["locality"])
        except ValueError:
            raise ValueError(f"{where}: locality {cfg['locality']!r} must be 'LOCAL' or 'REMOTE'") from None
    # disk_capacity_bytes has a default: only the keys the user wrote count.
    written = set(config)
    if mode == "daemon":
        wrong = [k for k in EMBEDDED_ONLY if k in written]
        if wrong:
            raise ValueError(f"{where}: {wrong[0]} is a setting of mode 'embedded'; the daemon's own config sets its tiers")
    else:
        wrong = [k for k in DAEMON_ONLY if k in written]
        if wrong:
            raise ValueError(f"{where}: {wrong[0]} is a setting of mode 'daemon'")
        if "store" in written and ("disk_dir" in written or "disk_capacity_bytes" in written):
            raise ValueError(f"{where}: give either store or disk_dir (with disk_capacity_bytes), not both")
        if "store" not in written and "disk_dir" not in written:
            raise ValueError(
                f"{where}: mode 'embedded' needs disk_dir (an SSD directory) or store (a full store config)"
            )
    return cfg


def embedded_store_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The embedded store's config: SSD-only unless a full one is given
    (vLLM's CPU tier already is the RAM tier in front of this one)."""
    if "store" in cfg:
        return cfg["store"]
    return {"mode": "ssd-only", "disk": {"dir": cfg["disk_dir"], "capacity_bytes": cfg["disk_capacity_bytes"]}}


def chunk_namespace(spec: OffloadingSpec, chunk_bytes: int, salt: str | None) -> dict[str, Any]:
    """The kvtier namespace of this engine's CPU-tier chunks.

    A chunk is vLLM's own row of the CPU tier, opaque to kvtier: its layout
    is a plain byte count, and what makes two chunks compatible is what
    vLLM's own file tier fingerprints (``FileMapper``'s fields, taken the way
    ``FileSystemTierManager`` takes them) plus the size."""
    from vllm.v1.kv_offload.file_mapper import FileMapper

    fields = FileMapper.from_offloading_spec(
        root_dir="",
        offloading_spec=spec,
        blocks_per_file=spec.blocks_per_chunk,
        parallel_agnostic=True,
    ).get_run_config()
    fingerprint = json.dumps({"vllm_chunk": fields, "chunk_bytes": chunk_bytes}, sort_keys=True, separators=(",", ":"))
    ns: dict[str, Any] = {
        "model_id": str(spec.config.model.name),
        "revision": "vllm-offload-chunk:" + hashlib.sha256(fingerprint.encode()).hexdigest()[:32],
        "layout": {
            "num_layers": 1,
            "kv_heads": 1,
            "head_dim": chunk_bytes,
            "block_tokens": 1,
            "kind": "mla",
            "dtype": "fp8e4m3",
        },
        "tp_rank": 0,
        "tp_size": 1,
    }
    if salt:
        ns["salt"] = salt
    return ns


def _text(e: BaseException) -> str:
    """An error as text for the log. Never the exception itself: a log
    record that keeps it keeps its traceback's frames, and with them views
    of vLLM's CPU tier that then cannot be unmapped."""
    return f"{type(e).__name__}: {e}"


class _RateLimitedLog:
    """Warns about a recurring failure once per `interval_s` per kind, so a
    kvtierd that is down does not flood the engine's log."""

    def __init__(self, interval_s: float = 30.0):
        self._interval_s = interval_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def warn(self, kind: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(kind)
            if last is not None and now - last < self._interval_s:
                self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
                return
            self._last[kind] = now
            suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            msg += " (%d more like it since the last warning)"
            args = (*args, suppressed)
        logger.warning(msg, *args)


@dataclass
class _Outcome:
    """What a job's thread did, read on the scheduler thread."""

    job_id: JobId
    is_load: bool
    # Leading chunks stored or loaded.
    done: int
    seconds: float


class _Jobs:
    """The tier's transfer threads: loads before stores, a bounded store
    queue, outcomes collected for ``get_finished_jobs``."""

    def __init__(self, threads: int, max_queued_stores: int):
        self._cv = threading.Condition()
        self._loads: deque[tuple[JobId, Callable[[], int]]] = deque()
        self._stores: deque[tuple[JobId, Callable[[], int]]] = deque()
        self._max_queued_stores = max_queued_stores
        self._running = 0
        self._outcomes: list[_Outcome] = []
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"kvtier-vllm-tier-{i}", daemon=True) for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, job_id: JobId, is_load: bool, run: Callable[[], int]) -> bool:
        """Queues a job; False (nothing queued) when the store queue is full
        or the tier is shut down."""
        with self._cv:
            if self._closed:
                return False
            queue = self._loads if is_load else self._stores
            if not is_load and len(queue) >= self._max_queued_stores:
                return False
            queue.append((job_id, run))
            self._cv.notify()
            return True

    def take_outcomes(self) -> list[_Outcome]:
        with self._cv:
            out, self._outcomes = self._outcomes, []
            return out

    def busy(self) -> bool:
        with self._cv:
            return bool(self._loads or self._stores or self._running or self._outcomes)

    def wait_idle(self) -> None:
        """Blocks until no job is queued or running (their outcomes queued)."""
        with self._cv:
            self._cv.wait_for(lambda: not (self._loads or self._stores or self._running))

    def close(self) -> None:
        """Runs what is queued, then stops the threads."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()

    def _work(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._loads or self._stores or self._closed)
                if self._loads:
                    (job_id, run), is_load = self._loads.popleft(), True
                elif self._stores:
                    (job_id, run), is_load = self._stores.popleft(), False
                else:
                    return  # closed and drained
                self._running += 1
            start = time.monotonic()
            try:
                done = run()
            except Exception:
                # The job's own code reports kvtier's errors; this is a bug,
                # and still a failed job rather than a dead thread.
                logger.error("kvtier: job %s raised:\n%s", job_id, traceback.format_exc())
                done = 0
            outcome = _Outcome(job_id, is_load, done, time.monotonic() - start)
            with self._cv:
                self._outcomes.append(outcome)
                self._running -= 1
                self._cv.notify_all()


class _Lookups(AsyncLookupManager):
    """vLLM's async lookup front end, asking kvtier off the scheduler thread."""

    def __init__(self, tier: KvTierSecondaryTier, tier_type: str):
        self._tier = tier
        super().__init__(tier_type=tier_type)

    def batch_lookup(self, keys: list[OffloadKey], req_context: ReqContext) -> Iterable[bool]:
        return self._tier._present(keys)


@dataclass
class _Job:
    keys: list[OffloadKey]
    is_load: bool


class KvTierSecondaryTier(SecondaryTierManager):
    """See the module docs."""

    medium: ClassVar[Medium] = Medium.STORAGE

    def __init__(
        self,
        offloading_spec: OffloadingSpec,
        primary_kv_view: memoryview,
        tier_type: str,
        backpressure_detector: BackpressureDetector | None = None,
        **config: Any,
    ):
        cfg = parse_tier_config(config)
        super().__init__(
            offloading_spec=offloading_spec,
            primary_kv_view=primary_kv_view,
            tier_type=tier_type,
            backpressure_detector=backpressure_detector,
        )
        if cfg.get("locality") is not None:
            self.locality = Locality(cfg["locality"])
        self._cfg = cfg
        self._batch_chunks = max(1, cfg["max_batch_bytes"] // self.block_size_bytes)
        self._namespace = chunk_namespace(offloading_spec, self.block_size_bytes, cfg.get("salt"))
        self._log = _RateLimitedLog()

        # Shared with kvtier.vllm, through its own config (its defaults, such
        # as the daemon's call timeout, included): one embedded store per
        # config in a process (its SSD directory has one owner), and the
        # daemon client that reconnects at most every 2 s while kvtierd is
        # down.
        from kvtier.vllm import open_store, parse_extra_config

        if cfg["mode"] == "daemon":
            endpoint = cfg.get("endpoint", "http://127.0.0.1:50051")
            daemon = {"mode": "daemon", "endpoint": endpoint}
            if cfg.get("token"):
                daemon["token"] = cfg["token"]
            self._store = open_store(parse_extra_config(daemon))
            self._where = f"kvtierd at {endpoint}"
        else:
            self._store = open_store(parse_extra_config({"mode": "embedded", "store": embedded_store_config(cfg)}))
            self._where = "the embedded kvtier store"
        self._ns_lock = threading.Lock()
        self._ns_id: bytes | None = None
        if cfg["mode"] == "embedded":
            # A namespace the store cannot hold (a chunk over its largest
            # block) is a config error: say so at startup. A daemon may be
            # down now; its jobs register when it answers.
            self._ns()

        # The CPU tier as (chunks, chunk bytes), sharing its memory. Taken
        # after everything that can fail, and dropped in shutdown(): vLLM
        # cannot unmap its CPU tier while an array (say, in a failed
        # constructor's traceback) still holds it.
        self._chunks: np.ndarray | None = np.asarray(primary_kv_view).view(np.uint8)
        assert self._chunks.ndim == 2, f"CPU tier view of shape {self._chunks.shape}, not (chunks, bytes)"
        assert self._chunks.shape[1] == self.block_size_bytes, (
            f"CPU tier rows of {self._chunks.shape[1]} bytes, chunks of {self.block_size_bytes}"
        )
        self._num_chunks = self._chunks.shape[0]
        self._jobs_meta: dict[JobId, _Job] = {}
        # Jobs answered at submit (a full store queue fails one; an empty
        # one is done), reported by the next get_finished_jobs.
        self._answered: list[_Outcome] = []
        self._jobs = _Jobs(cfg["io_threads"], cfg["max_queued_stores"])
        self._lookups = _Lookups(self, tier_type)
        logger.info(
            "kvtier: secondary tier %r on %s, chunks of %d bytes, %d threads",
            tier_type,
            self._where,
            self.block_size_bytes,
            cfg["io_threads"],
        )

    # ------------------------------------------------------ kvtier, off-thread

    def _ns(self) -> bytes:
        """The namespace id, registered on first use (raises KvTierError
        while kvtier cannot register it)."""
        with self._ns_lock:
            if self._ns_id is None:
                self._ns_id = self._store.register_namespace(self._namespace)
            return self._ns_id

    def _call(self, op: Callable[[bytes], Any]) -> Any:
        """Runs `op(ns_id)`; a daemon that forgot the namespace (it
        restarted) gets it registered again, once."""
        ns = self._ns()
        try:
            return op(ns)
        except kvtier.UnknownNamespaceError:
            with self._ns_lock:
                self._ns_id = None
            return op(self._ns())

    def _keys(self, ns: bytes, keys: list[OffloadKey]) -> list[bytes]:
        return [kvtier.key_from_hash(ns, bytes(k)) for k in keys]

    def _present(self, keys: list[OffloadKey]) -> list[bool]:
        """Whether each key is in kvtier, each on its own (vLLM asks a
        sliding-window group's keys last first): kvtier answers prefixes, so
        each miss starts a new one. After LOOKUPS_PER_BATCH calls the keys
        left count as misses: a new prompt's hundreds of misses cost a few
        calls, and a miss costs reuse, never bytes."""
        found = [False] * len(keys)
        try:

            def walk(ns: bytes) -> None:
                found[:] = [False] * len(keys)
                kt = self._keys(ns, keys)
                pos = 0
                for _ in range(LOOKUPS_PER_BATCH):
                    if pos >= len(kt):
                        return
                    hit, _ = self._store.lookup(ns, kt[pos:])
                    found[pos : pos + hit] = [True] * hit
                    pos += hit + 1

            self._call(walk)
        except kvtier.KvTierError as e:
            self._log.warn("lookup", "kvtier: lookup in %s failed, answering misses: %s", self._where, _text(e))
            return [False] * len(keys)
        return found

    # The CPU tier's memory is touched only in the innermost frames below,
    # never held by a caller's: a frame that an error's traceback keeps
    # alive (a log record holding the error) must not keep a view of it.

    def _rows(self, ids: np.ndarray) -> np.ndarray | None:
        """The CPU tier's rows `ids` as one array sharing its memory when
        they are consecutive, else None."""
        chunks = self._chunks
        assert chunks is not None, "the tier is shut down"
        # Fancy indexing would wrap a negative id and slicing would clip.
        assert ids.min() >= 0, f"chunk ids {ids} outside the CPU tier"
        assert ids.max() < self._num_chunks, f"chunk ids {ids} outside the CPU tier of {self._num_chunks}"
        if len(ids) > 1 and not np.all(np.diff(ids) == 1):
            return None
        return chunks[int(ids[0]) : int(ids[0]) + len(ids)]

    def _put(self, ns: bytes, keys: list[bytes], ids: np.ndarray) -> None:
        rows = self._rows(ids)
        if rows is None:
            assert self._chunks is not None, "the tier is shut down"
            rows = self._chunks[ids]  # a copy, gathered
        self._store.put(ns, keys, rows)

    def _get(self, ns: bytes, keys: list[bytes], ids: np.ndarray) -> tuple[int, int | None]:
        rows = self._rows(ids)
        if rows is not None:
            return self._store.get(ns, keys, rows)
        staging = np.empty((len(ids), self.block_size_bytes), np.uint8)
        got, failed = self._store.get(ns, keys, staging)
        assert self._chunks is not None, "the tier is shut down"
        self._chunks[ids[:got]] = staging[:got]
        return got, failed

    def _store_job(self, keys: list[OffloadKey], ids: np.ndarray) -> int:
        """Puts the chunks in batches; returns how many leading ones kvtier
        holds (all of them, or 0 when it failed)."""

        def put(ns: bytes) -> None:
            kt = self._keys(ns, keys)
            for a in range(0, len(kt), self._batch_chunks):
                b = min(a + self._batch_chunks, len(kt))
                self._put(ns, kt[a:b], ids[a:b])

        try:
            self._call(put)
        except kvtier.KvTierError as e:
            self._log.warn("store", "kvtier: store of %d chunks to %s skipped: %s", len(keys), self._where, _text(e))
            return 0
        return len(keys)

    def _load_job(self, keys: list[OffloadKey], ids: np.ndarray) -> int:
        """Gets the chunks into the CPU tier's slots; returns how many
        leading ones arrived verified. Slots after those may hold anything:
        they are reported failed, and vLLM frees them unread."""
        loaded = 0

        def get(ns: bytes) -> None:
            nonlocal loaded
            kt = self._keys(ns, keys)
            for a in range(loaded, len(kt), self._batch_chunks):
                b = min(a + self._batch_chunks, len(kt))
                got, failed = self._get(ns, kt[a:b], ids[a:b])
                loaded += got
                if got < b - a:
                    if failed is not None:
                        self._log.warn(
                            "corrupt",
                            "kvtier: chunk %d of a load from %s failed verification; vLLM recomputes it",
                            loaded,
                            self._where,
                        )
                    return

        try:
            self._call(get)
        except kvtier.KvTierError as e:
            self._log.warn("load", "kvtier: load of %d chunks from %s failed: %s", len(keys), self._where, _text(e))
        return loaded

    # ------------------------------------------- vLLM's scheduler-side calls

    def lookup(self, key: OffloadKey, req_context: ReqContext) -> LookupResult:
        found = self._lookups.lookup(key, req_context)
        if found is None:
            return LookupResult.RETRY
        return LookupResult.HIT if found else LookupResult.MISS

    def submit_store(self, job_metadata: TransferJob) -> None:
        self._submit(job_metadata, is_load=False)

    def submit_load(self, job_metadata: TransferJob) -> None:
        self._submit(job_metadata, is_load=True)

    def _submit(self, job: TransferJob, is_load: bool) -> None:
        keys = list(job.keys)
        ids = np.asarray(job.chunk_ids, dtype=np.int64).copy()
        assert len(keys) == len(ids), f"job {job.job_id}: {len(keys)} keys but {len(ids)} chunk ids"
        self._jobs_meta[job.job_id] = _Job(keys, is_load)
        if not keys:
            # Nothing to move: done (0 of 0), reported by the next poll.
            self._answered.append(_Outcome(job.job_id, is_load, 0, 0.0))
            return
        run = self._load_job if is_load else self._store_job
        if not self._jobs.submit(job.job_id, is_load, lambda: run(keys, ids)):
            self._log.warn(
                "queue",
                "kvtier: %d store jobs are waiting for %s (or the tier is shut down); store of %d chunks skipped",
                self._cfg["max_queued_stores"],
                self._where,
                len(keys),
            )
            self._answered.append(_Outcome(job.job_id, is_load, 0, 0.0))

    def get_finished_jobs(self) -> Iterable[JobResult]:
        results = []
        outcomes, self._answered = self._answered, []
        outcomes += self._jobs.take_outcomes()
        for o in outcomes:
            job = self._jobs_meta.pop(o.job_id)
            n = len(job.keys)
            ok = o.done == n
            seconds = o.seconds if o.done else None
            moved = o.done * self.block_size_bytes if o.done else None
            if not job.is_load:
                if ok and n and hasattr(self._lookups, "mark_present"):
                    self._lookups.mark_present(job.keys)  # vLLM >= 0.34
                results.append(JobResult(job_id=o.job_id, success=ok, transfer_time=seconds, transfer_bytes=moved))
                continue
            if not ok:
                # The chunks that did not arrive are misses from now on, so
                # vLLM does not retry a doomed promotion (its #49176).
                self._lookups.mark_miss(job.keys[o.done :])
            results.append(
                JobResult(
                    job_id=o.job_id,
                    success=ok,
                    successful_keys=tuple(job.keys[: o.done]) if 0 < o.done < n else None,
                    transfer_time=seconds,
                    transfer_bytes=moved,
                )
            )
        return results

    def has_pending_work(self) -> bool:
        return bool(self._jobs_meta) or self._jobs.busy()

    def on_new_request(self, req_context: ReqContext) -> RequestOffloadingContext:
        return RequestOffloadingContext()

    def on_request_finished(self, req_context: ReqContext) -> None:
        self._lookups.cleanup(req_context.req_id)

    def on_schedule_end(self, context: ScheduleEndContext) -> None:
        self._lookups.flush()

    def drain_jobs(self) -> None:
        # Queued jobs run too (none is cancelled): each is bounded by kvtier's
        # own timeouts, and a store that ran is KV not lost.
        self._jobs.wait_idle()

    def shutdown(self) -> None:
        self._lookups.shutdown()
        self._jobs.close()
        # Last: no thread touches the CPU tier any more, and vLLM unmaps it
        # next (it cannot while this array holds it).
        self._chunks = None
