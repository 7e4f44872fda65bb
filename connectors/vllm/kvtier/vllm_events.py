"""Tier-tagged KV events from kvtier's vLLM connector.

vLLM publishes KV events (``BlockStored`` / ``BlockRemoved``, enabled with
``--kv-events-config``) for its GPU prefix cache, and takes more from a
connector's scheduler side (``take_events()``). NVIDIA Dynamo's KV-aware
router reads them and weighs a hit by the event's ``medium``. This module
turns kvtier's tier events into those events, so the router sees what
kvtier holds for this engine, per tier:

=========  ===============  ==========================================
kvtier     medium           what Dynamo's router makes of it
=========  ===============  ==========================================
host RAM   ``CPU_PINNED``   host tier (``--router-host-cache-hit-weight``)
SSD        ``DISK``         disk tier (``--router-disk-cache-hit-weight``)
blob       ``EXTERNAL``     weighed like disk
=========  ===============  ==========================================

Blocks only a cluster peer holds are not announced: every engine of the
cluster reaches a peer's block at the same cost, so it does not tell the
router which engine to prefer, and the peer's own engine announces what its
store holds.

How: the connector remembers, for each block it saves or loads, its vLLM
block hash, parent hash, tokens and extra keys (a bounded table: a block
that falls out of it is announced removed, so the router never keeps a
block the connector can no longer speak for). A background thread reads
the store's event feed (embedded: in process; daemon: the ``Events`` RPC,
one namespace per engine) and the tiers of newly remembered blocks
(``locate``), and queues vLLM events that ``take_events()`` hands over
without blocking the step. When the feed says resync (the reader fell
behind, or kvtierd restarted), it re-reads the tiers of every remembered
block and announces only the differences: a block that is gone is reported
removed, never kept.
"""

from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

import kvtier

logger = logging.getLogger("kvtier.vllm")

# kvtier tier name -> the medium announced to the router.
MEDIA = {"host": "CPU_PINNED", "disk": "DISK", "blob": "EXTERNAL"}
# Blocks whose hashes and tokens the connector keeps, by default.
DEFAULT_MAX_BLOCKS = 1 << 18
# Events read or keys located per store call.
PAGE = 4096
# The longest wait between reads of a feed that fails.
MAX_RETRY_S = 5.0


@dataclass
class _Block:
    block_hash: Any
    parent: Any
    token_ids: list[int]
    lora_id: int | None
    lora_name: str | None
    extra_keys: list | None
    tiers: set[str] = field(default_factory=set)


class TierEvents:
    """See the module docs. ``store`` is an embedded ``kvtier.Store`` or a
    daemon client; ``ns_id`` the engine's namespace."""

    def __init__(self, store: Any, ns_id: bytes, block_size: int, max_blocks: int = DEFAULT_MAX_BLOCKS,
                 interval_s: float = 0.05, namespace: dict | None = None):
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        self._BlockStored, self._BlockRemoved = BlockStored, BlockRemoved
        self._store = store
        self._ns = ns_id
        self._namespace = namespace
        self._block_size = block_size
        self._max_blocks = max(1, int(max_blocks))
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._blocks: collections.OrderedDict[bytes, _Block] = collections.OrderedDict()
        self._to_locate: list[bytes] = []
        self._out: list[Any] = []
        self._epoch = 0
        self._cursor = 0
        self.published = 0
        self.resyncs = 0
        self.failures = 0
        self._flushes: list[threading.Event] = []
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvtier-events", daemon=True)
        self._thread.start()

    # ------------------------------------------------ the scheduler's thread

    def remember(self, keys: list[bytes], request: Any, first: int) -> None:
        """Blocks ``first .. first + len(keys)`` of ``request`` (being saved
        or loaded): their identity for the router, and a check of where
        kvtier holds them."""
        if not keys:
            return
        blocks = _describe(request, first, len(keys), self._block_size)
        evicted: list[_Block] = []
        with self._lock:
            for key, b in zip(keys, blocks):
                if key in self._blocks:
                    self._blocks.move_to_end(key)
                    continue
                self._blocks[key] = b
                self._to_locate.append(key)
            while len(self._blocks) > self._max_blocks:
                _, old = self._blocks.popitem(last=False)
                evicted.append(old)
            for old in evicted:
                self._removed(old, set(old.tiers))
        self._wake.set()

    def take(self) -> list[Any]:
        """The vLLM events queued since the last call (never blocks on the
        store)."""
        with self._lock:
            out, self._out = self._out, []
        self.published += len(out)
        return out

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Waits until the feed is read up to now (tests, benchmarks);
        False if that read failed or took longer than ``timeout_s``."""
        done = threading.Event()
        with self._lock:
            self._flushes.append(done)
        self._wake.set()
        return done.wait(timeout_s) and getattr(done, "ok", False)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5)

    # ------------------------------------------------------ the feed thread

    def _run(self) -> None:
        failing = 0  # polls failed in a row: the wait backs off, one warning
        while not self._stop.is_set():
            with self._lock:
                flushes, self._flushes = self._flushes, []
            ok = False
            try:
                self._poll()
                ok = True
                if failing:
                    logger.info("kvtier: tier events flow again")
                failing = 0
            except kvtier.UnknownNamespaceError:
                self._store_forgot()
            except Exception as e:  # noqa: BLE001 - a feed failure must not stop the engine
                self.failures += 1
                if not failing:
                    logger.warning("kvtier: tier events unavailable for now (the engine serves on): %s", e)
                failing += 1
            for f in flushes:
                f.ok = ok
                f.set()
            self._wake.wait(min(self._interval_s * (1 << min(failing, 7)), MAX_RETRY_S))
            self._wake.clear()

    def _store_forgot(self) -> None:
        """The store does not know the namespace (kvtierd came back without
        its data): it holds none of the blocks. Register it again and
        re-read every block's tiers, so each announced one is reported gone."""
        self.resyncs += 1
        self._epoch, self._cursor = 0, 0
        with self._lock:
            self._to_locate = list(self._blocks)
        if self._namespace is not None:
            try:
                self._store.register_namespace(self._namespace)
            except Exception as e:  # noqa: BLE001 - tried again on the next poll
                self.failures += 1
                logger.warning("kvtier: could not register the namespace again: %s", e)

    def _poll(self) -> None:
        # Blocks whose tiers changed in this poll, with their tiers before:
        # announced together at the end, grouped by medium and in feed
        # order (a demotion of many blocks is two events, not two per block).
        changed: dict[bytes, tuple[_Block, frozenset]] = {}

        def note(key: bytes, b: _Block) -> None:
            if key not in changed:
                changed[key] = (b, frozenset(b.tiers))

        try:
            self._read_feed(note)
            self._locate_new(note)
        finally:
            with self._lock:
                self._announce(changed.values())

    def _read_feed(self, note) -> None:
        while True:
            page = self._store.events(self._ns, self._epoch, self._cursor, PAGE)
            if page["resync"]:
                self.resyncs += 1
                self._epoch, self._cursor = page["epoch"], page["cursor"]
                with self._lock:
                    self._to_locate = list(self._blocks)
                return
            self._epoch, self._cursor = page["epoch"], page["cursor"]
            with self._lock:
                for _, change, tier, key in page["events"]:
                    b = self._blocks.get(key)
                    if b is None or tier not in MEDIA:
                        continue
                    note(key, b)
                    if change == "stored":
                        b.tiers.add(tier)
                    elif change == "removed":
                        b.tiers.discard(tier)
            if len(page["events"]) < PAGE:
                return

    def _locate_new(self, note) -> None:
        with self._lock:
            todo, self._to_locate = self._to_locate, []
        for i in range(0, len(todo), PAGE):
            chunk = todo[i : i + PAGE]
            try:
                located = self._store.locate(self._ns, chunk)
            except Exception:
                with self._lock:
                    self._to_locate = todo[i:] + self._to_locate
                raise
            with self._lock:
                for key, tiers in zip(chunk, located):
                    b = self._blocks.get(key)
                    if b is None:
                        continue
                    note(key, b)
                    b.tiers = {t for t in tiers if t in MEDIA}

    def _announce(self, changed) -> None:
        """Events for what changed: removals first, then stores (parents
        before children, as the feed had them), by medium."""
        changed = list(changed)
        for tier in MEDIA:
            for b, before in changed:
                if tier in before and tier not in b.tiers:
                    self._removed(b, {tier})
        for tier in MEDIA:
            for b, before in changed:
                if tier in b.tiers and tier not in before:
                    self._stored(b, tier)

    # Called with the lock held.

    def _stored(self, b: _Block, tier: str) -> None:
        last = self._out[-1] if self._out else None
        # A block that continues the last announced run (same tier, its
        # parent is that run's last block) joins it: one event per run of
        # a prompt, as vLLM announces its own.
        if (
            isinstance(last, self._BlockStored)
            and last.medium == MEDIA[tier]
            and last.block_hashes[-1] == b.parent
            and last.lora_name == b.lora_name
            and (last.extra_keys is None) == (b.extra_keys is None)
        ):
            last.block_hashes.append(b.block_hash)
            last.token_ids.extend(b.token_ids)
            if b.extra_keys is not None:
                last.extra_keys.extend(b.extra_keys)
            return
        self._out.append(
            self._BlockStored(
                block_hashes=[b.block_hash],
                parent_block_hash=b.parent,
                token_ids=list(b.token_ids),
                block_size=self._block_size,
                lora_id=b.lora_id,
                medium=MEDIA[tier],
                lora_name=b.lora_name,
                extra_keys=list(b.extra_keys) if b.extra_keys is not None else None,
            )
        )

    def _removed(self, b: _Block, tiers: set[str]) -> None:
        for t in sorted(tiers, key=list(MEDIA).index):
            last = self._out[-1] if self._out else None
            if isinstance(last, self._BlockRemoved) and last.medium == MEDIA[t]:
                last.block_hashes.append(b.block_hash)
            else:
                self._out.append(self._BlockRemoved(block_hashes=[b.block_hash], medium=MEDIA[t]))


def _describe(request: Any, first: int, n: int, block_size: int) -> list[_Block]:
    """The identity vLLM gives blocks ``first .. first + n`` of ``request``
    in its own KV events: hash (as vLLM publishes it), parent, tokens, LoRA
    and extra keys."""
    from vllm.v1.core.kv_cache_utils import (
        generate_block_hash_extra_keys,
        maybe_convert_block_hash,
        to_event_extra_keys,
    )

    hashes = request.block_hashes
    tokens = request.all_token_ids
    lora = getattr(request, "lora_request", None)
    out = []
    mm_idx = 0
    for i in range(first, first + n):
        start, end = i * block_size, (i + 1) * block_size
        try:
            extra, mm_idx = generate_block_hash_extra_keys(request, start, end, mm_idx)
        except Exception:  # noqa: BLE001 - an engine without extra keys
            extra = None
        out.append(
            _Block(
                block_hash=maybe_convert_block_hash(hashes[i]),
                parent=maybe_convert_block_hash(hashes[i - 1]) if i > 0 else None,
                token_ids=list(tokens[start:end]),
                lora_id=lora.adapter_id if lora else None,
                lora_name=lora.name if lora else None,
                extra_keys=to_event_extra_keys([extra]) if extra else None,
            )
        )
    return out
