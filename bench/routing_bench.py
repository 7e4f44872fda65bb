"""The engine half of ``kvtier-bench routing``: a Mooncake-format trace
replayed over N simulated engines routed by NVIDIA Dynamo's real KV router
(``dynamo._core.KvRouter`` from the ai-dynamo-runtime wheel), twice in one
run: the router seeing GPU events only, and seeing kvtier's tier events
too. Prints one JSON object with raw counts; ``kvtier-bench routing``
turns them into figures.

Each engine has:

- a GPU prefix cache: an LRU of ``--gpu-blocks`` blocks, which publishes
  what vLLM publishes for its own prefix cache (``BlockStored`` /
  ``BlockRemoved``, medium ``GPU``);
- its own kvtier store: the real embedded ``kvtier.Store`` with a host tier
  of ``--host-blocks`` and an SSD tier of ``--disk-blocks`` blocks (tiny
  blocks: the hit rates do not depend on their size), read on a GPU miss
  and written with every block of every prompt, as the connector does;
- in the tier-aware run, kvtier's connector event translator
  (``kvtier.vllm_events.TierEvents``) over that store's event feed.

Both kinds of events go through vLLM's real ``ZmqEventPublisher`` (one per
engine, on 127.0.0.1) into Dynamo's ``KvEventPublisher`` relay, as under
``python -m dynamo.vllm``, and from there to the router. The engines
register in Dynamo's discovery (file backend) so the router routes to
them. Before each request the router is caught up: the previous request's
events are applied (checked through ``get_overlap_scores``).

A request is routed with ``best_worker`` (and tracked: the last
``--concurrency`` requests count as running, so the router balances load
as it does in production), then served: its hit is the leading run of its
blocks in the chosen engine's GPU cache, continued in that engine's kvtier
tiers; hit tokens are capped at the prompt. Only full blocks are cached.

Dynamo's event plane binds the machine's address: ``kvtier-bench routing``
runs this script in a network namespace with only ``lo`` up (``--netns``).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python" / "tests"))
from kvtier_testkit import free_port, lo_up  # noqa: E402


def load_trace(path: str, n: int) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            if line.strip():
                out.append(json.loads(line))
                if len(out) >= n:
                    break
    return out


class FakeRequest:
    """What kvtier's event translator reads of a vLLM request."""

    def __init__(self, block_hashes, tokens):
        self.block_hashes = block_hashes
        self.all_token_ids = tokens
        self.lora_request = None
        self.request_id = "bench"


class Engine:
    def __init__(self, i, args, tier_events, workdir, component):
        import kvtier
        from vllm.distributed.kv_events import ZmqEventPublisher

        self.i = i
        self.args = args
        self.port = free_port()
        # vLLM binds only a wildcard endpoint (tcp://*:port, as documented);
        # inside the bench's network namespace that is loopback only.
        self.pub = ZmqEventPublisher(data_parallel_rank=0, endpoint=f"tcp://*:{self.port}")
        self.gpu: collections.OrderedDict[int, None] = collections.OrderedDict()
        bb = args.block_tokens * 2 * 2  # 1 layer, K and V, 1 head of 1 dim, f16
        d = workdir / f"engine-{i}"
        self.store = kvtier.Store(
            {
                "host": {"capacity_bytes": args.host_blocks * bb, "pin_memory": False},
                "disk": {
                    "dir": str(d),
                    "capacity_bytes": max(args.disk_blocks * bb, 4 << 20),
                    "segment_bytes": 1 << 20,
                },
            }
        )
        self.ns = self.store.register_namespace(
            {
                "model_id": "routing-bench",
                "layout": {"num_layers": 1, "kv_heads": 1, "head_dim": 1, "block_tokens": args.block_tokens,
                           "kind": "kv", "dtype": "f16"},
            }
        )
        self.block_bytes = bb
        self.events = None
        if tier_events:
            from kvtier.vllm_events import TierEvents

            self.events = TierEvents(self.store, self.ns, args.block_tokens, max_blocks=1 << 22, interval_s=3600)
        self.component = component
        self.published = 0
        self.requests = 0
        self.warmup_resends = 0

    async def register(self, loop):
        from dynamo._core import (
            DistributedRuntime,
            KvEventPublisher,
            ModelInput,
            ModelRuntimeConfig,
            ModelType,
            WorkerType,
            register_model,
        )

        self.drt = DistributedRuntime(loop, "file", "tcp", event_plane="zmq")
        self.ep = self.drt.endpoint(self.component)

        async def generate(request, context=None):
            yield {"token_ids": [1], "finish_reason": "stop"}

        self.serving = asyncio.ensure_future(self.ep.serve_endpoint(generate))
        rc = ModelRuntimeConfig()
        rc.total_kv_blocks = self.args.gpu_blocks
        rc.max_num_seqs = 256
        rc.max_num_batched_tokens = 1 << 20
        rc.kv_event_publishing_enabled = True
        await register_model(
            ModelInput.Tokens, ModelType.Completions, self.ep, str(ROOT), "routing-bench",
            worker_type=WorkerType.Aggregated, kv_cache_block_size=self.args.block_tokens, runtime_config=rc,
            skip_model_assets=True,
        )
        self.relay = KvEventPublisher(self.ep, kv_block_size=self.args.block_tokens,
                                      zmq_endpoint=f"tcp://127.0.0.1:{self.port}")
        self.id = self.ep.connection_id()

    async def connected(self, router):
        """Returns once this engine's events reach the router reliably.
        Right after start, events of an engine can be lost between vLLM's
        ZMQ publisher, Dynamo's relay and the router (seen here: a store or
        a removal that never arrived, for the first second or two); a lost
        event leaves a hole in the router's tree that every later prompt
        through that block inherits. A sentinel block (tokens no trace block
        has) is stored and removed, each re-sent until the router shows it,
        until three cycles in a row took one send each. Re-sends are
        counted (``warmup_resends``)."""
        from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch

        bt = self.args.block_tokens
        tokens = [200_000 + self.i] * bt
        h = ext_hash(bytes([0xFF] * 24) + self.i.to_bytes(8, "little"))

        async def device_blocks():
            rows = (await router.get_overlap_scores(tokens))["workers"]
            return next((r.get("device_blocks", 0) for r in rows if r["worker_id"] == self.id), 0)

        def stored():
            return [BlockStored(block_hashes=[h], parent_block_hash=None, token_ids=tokens, block_size=bt,
                                lora_id=None, medium="GPU", lora_name=None)]

        def removed():
            return [BlockRemoved(block_hashes=[h], medium="GPU")]

        deadline = time.monotonic() + 120
        clean = 0
        while clean < 3:
            resent = 0
            for make, done in ((stored, lambda n: n >= 1), (removed, lambda n: n == 0)):
                while True:
                    self.pub.publish(KVEventBatch(ts=time.time(), events=make()))
                    wait = time.monotonic() + 1.0
                    while not done(await device_blocks()) and time.monotonic() < wait:
                        await asyncio.sleep(0.01)
                    if done(await device_blocks()):
                        break
                    resent += 1
                    assert time.monotonic() < deadline, f"engine {self.i}: its events did not reach the router in 120 s"
            self.warmup_resends += resent
            clean = clean + 1 if resent == 0 else 0

    def publish(self, events):
        from vllm.distributed.kv_events import KVEventBatch

        if events:
            self.pub.publish(KVEventBatch(ts=time.time(), events=events))
            self.published += len(events)

    def serve(self, ids, tokens, hashes):
        """Serves a request's full blocks (``hashes``: the engine's hashes
        of ``ids``): returns the hit blocks (GPU, then kvtier) and publishes
        what changed."""
        import kvtier
        from vllm.distributed.kv_events import BlockRemoved, BlockStored

        self.requests += 1
        g = 0
        while g < len(ids) and ids[g] in self.gpu:
            g += 1
        kvkeys = kvtier.keys_from_hashes(self.ns, hashes) if hashes else []
        t = 0
        if g < len(ids):
            t, _ = self.store.lookup(self.ns, kvkeys[g:])
        events = []
        if kvkeys:
            # The engine computes or loads every block; kvtier saves them
            # all (what it holds already is skipped), as the connector does.
            self.store.put(self.ns, kvkeys, bytes(self.block_bytes * len(kvkeys)))
            if self.events is not None:
                self.events.remember(kvkeys, FakeRequest(hashes, tokens), 0)
                self.events.flush()
                events.extend(self.events.take())
        # The GPU prefix cache: touch the hits, insert the rest, evict LRU.
        for bid in ids:
            self.gpu[bid] = None
            self.gpu.move_to_end(bid)
        # Blocks after the hit were computed (or loaded) again: announced
        # again from there, chained to the hit (the router's tree may have
        # dropped a block whose parent was evicted).
        inserted = list(range(g, len(ids)))
        evicted = []
        while len(self.gpu) > self.args.gpu_blocks:
            old, _ = self.gpu.popitem(last=False)
            evicted.append(old)
        if evicted:
            events.append(BlockRemoved(block_hashes=[ext_hash(engine_hash(b)) for b in evicted], medium="GPU"))
        # Announce the newly cached blocks still held, as one chained run
        # (vLLM announces a request's new full blocks together).
        run = []
        for j in inserted:
            if ids[j] not in self.gpu or (run and j != run[-1] + 1):
                break
            run.append(j)
        if run:
            bt = self.args.block_tokens
            events.append(
                BlockStored(
                    block_hashes=[ext_hash(hashes[j]) for j in run],
                    parent_block_hash=ext_hash(hashes[run[0] - 1]) if run[0] > 0 else None,
                    token_ids=tokens[run[0] * bt : (run[-1] + 1) * bt],
                    block_size=bt,
                    lora_id=None,
                    medium="GPU",
                    lora_name=None,
                )
            )
        self.publish(events)
        return g, t

    def close(self):
        if self.events is not None:
            self.events.close()
        self.relay.shutdown()
        self.pub.shutdown()
        self.serving.cancel()
        self.drt.shutdown()


def engine_hash(block_id: int) -> bytes:
    """The engine's (vLLM's) 32-byte hash of a trace block."""
    import hashlib

    return hashlib.blake2b(block_id.to_bytes(8, "little"), digest_size=32).digest()


def ext_hash(h: bytes):
    """A block hash as vLLM publishes it in KV events."""
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    return maybe_convert_block_hash(h)


def block_tokens(block_id: int, n: int) -> list[int]:
    """Tokens of a trace block: distinct per block id (ids are chained)."""
    return [((block_id * 1_000_003 + t * 31) % 120_000) + 1 for t in range(n)]


async def run(mode: str, reqs: list[dict], args, workdir) -> dict:
    from dynamo._core import DistributedRuntime, KvRouter, KvRouterConfig

    loop = asyncio.get_running_loop()
    component = f"kvtier-bench-{mode.replace('_', '-')}.worker.generate"
    engines = [Engine(i, args, mode == "tier_aware", workdir / mode, component) for i in range(args.workers)]
    for e in engines:
        await e.register(loop)
    by_id = {e.id: e for e in engines}
    drt = DistributedRuntime(loop, "file", "tcp", event_plane="zmq")
    cfg = KvRouterConfig(host_cache_hit_weight=args.host_weight, disk_cache_hit_weight=args.disk_weight)
    router = KvRouter(drt.endpoint(component), args.block_tokens, cfg)
    end = time.monotonic() + 60
    while True:
        s = await router.get_overlap_scores([1] * args.block_tokens)
        if len(s["workers"]) == len(engines):
            break
        assert time.monotonic() < end, f"the router saw {len(s['workers'])} of {len(engines)} engines"
        await asyncio.sleep(0.2)
    bt = args.block_tokens
    for e in engines:
        await e.connected(router)
    hit = total = gpu_hit = tier_hit = unsynced = 0
    running: collections.deque[str] = collections.deque()
    t0 = time.monotonic()
    for n, r in enumerate(reqs):
        full = min(r["input_length"] // bt, len(r["hash_ids"]))
        ids = r["hash_ids"][:full]
        tokens = [t for b in ids for t in block_tokens(b, bt)]
        tail = r["input_length"] - full * bt
        route_tokens = tokens + [1] * tail
        rid = f"r{n}"
        wid, _, _ = await router.best_worker(route_tokens, request_id=rid)
        running.append(rid)
        e = by_id[wid]
        g, t = e.serve(ids, tokens, [engine_hash(b) for b in ids])
        gpu_hit += g * bt
        tier_hit += t * bt
        hit += min((g + t) * bt, r["input_length"])
        total += r["input_length"]
        while len(running) > args.concurrency:
            await router.free(running.popleft())
        # Catch the router up: this engine's GPU now holds the prompt's
        # last block, announced after every other event of the request.
        if ids:
            probe = tokens
            want = min(full, args.gpu_blocks)
            deadline = time.monotonic() + 30
            while True:
                rows = {x["worker_id"]: x for x in (await router.get_overlap_scores(probe))["workers"]}
                if rows.get(wid, {}).get("device_blocks", 0) >= want or full > args.gpu_blocks:
                    break
                if time.monotonic() > deadline:
                    # Counted and reported: the next decisions ran on a
                    # router that lagged.
                    unsynced += 1
                    break
                await asyncio.sleep(0.001)
        if time.monotonic() - t0 > args.max_seconds:
            break
    served = n + 1
    out = {
        "requests": served,
        "hit_tokens": hit,
        "input_tokens": total,
        "gpu_hit_tokens": gpu_hit,
        "tier_hit_tokens": tier_hit,
        "events": sum(e.published for e in engines),
        "requests_per_engine": [e.requests for e in engines],
        "unsynced_requests": unsynced,
        "warmup_resends": sum(e.warmup_resends for e in engines),
        "wall_s": time.monotonic() - t0,
    }
    for rid in running:
        await router.free(rid)
    for e in engines:
        e.close()
    drt.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trace", required=True)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--block-tokens", type=int, default=512)
    ap.add_argument("--gpu-blocks", type=int, default=640)
    ap.add_argument("--host-blocks", type=int, default=8192)
    ap.add_argument("--disk-blocks", type=int, default=65536)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-seconds", type=float, default=1200)
    # Dynamo's defaults (--router-host-cache-hit-weight, --router-disk-cache-hit-weight).
    ap.add_argument("--host-weight", type=float, default=0.75)
    ap.add_argument("--disk-weight", type=float, default=0.25)
    ap.add_argument("--netns", action="store_true")
    args = ap.parse_args()
    if args.netns:
        lo_up()
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="kvtier-routing-"))
    os.environ["DYN_FILE_KV"] = str(workdir / "discovery")
    os.environ.setdefault("DYN_LOG", "error")
    reqs = load_trace(args.trace, args.requests)
    try:
        out = {"workers": args.workers, "gpu_blocks": args.gpu_blocks, "host_blocks": args.host_blocks,
               "disk_blocks": args.disk_blocks, "block_tokens": args.block_tokens,
               "concurrency": args.concurrency, "host_weight": args.host_weight,
               "disk_weight": args.disk_weight}
        for mode in ("gpu_only", "tier_aware"):
            out[mode] = asyncio.run(run(mode, reqs, args, workdir))
        print(json.dumps(out), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
