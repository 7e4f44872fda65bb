"""KvTierConnector through vLLM's real scheduler on CPU: the step's save
stall, load and save GB/s, and the scheduler's prefix lookup, next to a
memcpy of the same bytes measured in the same run.

Run by `kvtier-bench connector` (which starts the kvtierd of daemon mode
and passes its endpoint); prints one JSON object. The engine is the test
harness (connectors/vllm/tests/vllm_harness.py): the real Scheduler, and a
fake model runner that writes known KV into CPU KV tensors and calls the
worker connector's hooks in the model runner's order. The connector is the
installed `kvtier.vllm`.

Per mode, two engines share the store and live across rounds, as engines
do across requests. Each round, the saving engine prefills `requests`
distinct prompts of `prefix_blocks` full blocks (plus a partial one): the
time its steps spend in `wait_for_save` is the save stall. The loading
engine (load_mode "sync"), which never computed them, serves the same
prompts: the time in `start_load_kv` is the load. Each call is timed next
to a memcpy of the same bytes and the connector's own block copy of the
same blocks (see `Memcpy`). Every loaded block is compared with the KV the
saving engine wrote; a wrong byte, a miss or a lost block exits 1 naming it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "connectors", "vllm", "tests"))

import vllm_harness as H  # noqa: E402  (sets the offline environment first)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import vllm  # noqa: E402

import kvtier  # noqa: E402
import kvtier.vllm as kv  # noqa: E402

CONNECTOR = ("KvTierConnector", "kvtier.vllm")
BLOCK_TOKENS = 16
# Prompt tokens after the full blocks: the connector never matches a
# prompt's last token, so a partial block makes every full one loadable.
TAIL_TOKENS = 8
MODES = ["embedded", "daemon"]


class Broken(Exception):
    """A broken invariant: wrong bytes, a lost block."""


class Memcpy:
    """The references, timed around each connector call they are compared
    with, so both see the machine in the same state: np.copyto of the same
    bytes between two touched buffers (before the call; it also leaves
    neither the KV nor the tier's memory in the CPU's caches), and the
    connector's own gather copy of the same blocks between the KV tensors
    and a touched buffer (after the call), which is the copy without the
    store."""

    def __init__(self, max_bytes: int):
        self.src = np.full(max_bytes, 5, dtype=np.uint8)
        self.dst = np.ones(max_bytes, dtype=np.uint8)
        self.staging = np.ones(max_bytes, dtype=np.uint8)

    def seconds(self, nbytes: int) -> float:
        t = time.perf_counter()
        np.copyto(self.dst[:nbytes], self.src[:nbytes])
        return time.perf_counter() - t

    def gather_seconds(self, c, direction: str, block_ids: list[int], nbytes: int) -> float:
        """`_copy_blocks` of `block_ids` in `direction`; a load copies the
        blocks out first and back in, so the KV is left as it was."""
        staging = self.staging[:nbytes]
        args = (c._layers(), c._layer_block_bytes(), list(block_ids), staging, "cpu")
        if direction == "load":
            kvtier._kvtier._copy_blocks("save", *args)
        t = time.perf_counter()
        kvtier._kvtier._copy_blocks(direction, *args)
        return time.perf_counter() - t


class Clock:
    """Replaces the connector's `wait_for_save` (direction "save") or
    `start_load_kv` ("load") with itself and times each call with bytes to
    move, next to both references. `calls`: [seconds, memcpy seconds,
    bytes, gather-copy seconds] per such call; calls with nothing to move
    are summed apart (a step pays them too)."""

    def __init__(self, c, direction: str, block_bytes: int, ref: Memcpy):
        self.c = c
        self.direction = direction
        self.name = "wait_for_save" if direction == "save" else "start_load_kv"
        self.fn = getattr(c, self.name)
        self.block_bytes = block_bytes
        self.ref = ref
        self.calls: list[list] = []
        self.idle_seconds = 0.0
        setattr(c, self.name, self)

    def __call__(self, *args, **kwargs):
        meta = self.c._get_connector_metadata()
        moves = meta.saves if self.direction == "save" else meta.loads
        block_ids = [b for m in moves for b in m.block_ids]
        nbytes = len(block_ids) * self.block_bytes
        ref = self.ref.seconds(nbytes) if nbytes else 0.0
        t = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            secs = time.perf_counter() - t
            if nbytes:
                gather = self.ref.gather_seconds(self.c, self.direction, block_ids, nbytes)
                self.calls.append([secs, ref, nbytes, gather])
            else:
                self.idle_seconds += secs

    def take(self) -> dict:
        """The calls since the last `take`, summed, and forgotten."""
        calls, idle = self.calls, self.idle_seconds
        self.calls, self.idle_seconds = [], 0.0
        return {
            "bytes": sum(c[2] for c in calls),
            "seconds": sum(c[0] for c in calls),
            "memcpy_seconds": sum(c[1] for c in calls),
            "gather_copy_seconds": sum(c[3] for c in calls),
            "calls": calls,
            "idle_calls_seconds": idle,
        }


def percentile(v: list[float], p: float) -> float:
    """Nearest rank, as the Rust benches compute it."""
    s = sorted(v)
    return s[max(1, min(len(s), math.ceil(p / 100 * len(s)))) - 1]


def drain(sched, worker, max_steps: int) -> None:
    """Steps until the scheduler holds nothing (bounded)."""
    for _ in range(max_steps):
        if not sched.has_requests():
            return
        H.step(sched, worker)
    raise Broken(f"requests still running after {max_steps} steps")


class Engine:
    """One engine instance (scheduler, fake model runner, connectors) that
    lives across rounds, as an engine does across requests: its staging
    and KV tensors are warm after the first round."""

    def __init__(self, bench: "Bench", mode: str, direction: str):
        self.sched, self.worker = bench.instance(bench.extra(mode))
        self.c = self.worker.connector
        if not self.c._direct:
            raise Broken("the harness's KV layout is not the connector's direct one; the gather reference needs it")
        self.clock = Clock(self.c, direction, bench.block_bytes, bench.memcpy)

    def close(self) -> None:
        self.c.shutdown()
        self.sched.connector.shutdown()


class Bench:
    def __init__(self, a, tmp: str):
        self.a = a
        hidden = a.kv_heads * a.head_dim
        self.model_dir = H.make_model_dir(
            tmp,
            num_layers=a.layers,
            hidden_size=hidden,
            num_heads=a.kv_heads,
            num_kv_heads=a.kv_heads,
            max_position_embeddings=4 * self.prompt_tokens(),
        )
        self.block_bytes = a.layers * BLOCK_TOKENS * a.kv_heads * 2 * a.head_dim * 2  # f16
        self.round_bytes = a.requests * a.prefix_blocks * self.block_bytes
        # No step moves more than a round's blocks.
        self.memcpy = Memcpy(self.round_bytes)

    def prompt_tokens(self) -> int:
        return self.a.prefix_blocks * BLOCK_TOKENS + TAIL_TOKENS

    def instance(self, extra):
        n = self.prompt_tokens()
        vc = H.make_vllm_config(
            self.model_dir,
            *CONNECTOR,
            extra,
            block_size=BLOCK_TOKENS,
            kv_load_failure_policy="recompute",  # as the README tells operators
            # Every request's blocks at once, the null block, a spare.
            num_gpu_blocks=self.a.requests * (self.a.prefix_blocks + 2) + 2,
            max_num_batched_tokens=2 * n,
            max_num_seqs=max(16, self.a.requests),
            max_model_len=2 * n,
        )
        kcc = H.make_kv_cache_config(vc)
        sched = H.make_scheduler(vc, kcc)
        worker = H.make_worker(vc, kcc)
        return sched, worker

    def prompts(self, mode: str, round_: int) -> list[list[int]]:
        """Distinct prompts per mode, round and request (vocab ids 4..255)."""
        rng = np.random.default_rng([MODES.index(mode), round_, self.a.seed])
        return [rng.integers(4, 256, self.prompt_tokens()).tolist() for _ in range(self.a.requests)]

    def extra(self, mode: str) -> dict:
        e = {"mode": mode, "load_mode": "sync", "salt": f"connector-bench-{os.getpid()}-{self.a.seed}"}
        if mode == "embedded":
            # Every round's blocks fit: nothing is evicted before it loads.
            e["host_capacity_bytes"] = self.a.rounds * self.round_bytes + (64 << 20)
        else:
            e["endpoint"] = self.a.endpoint
            # Staging for a whole round: a save is never skipped for want
            # of a free slot while the daemon stores the previous ones.
            e["staging_bytes"] = self.round_bytes + 2 * kv.SLOT_BLOCKS * self.block_bytes
        return e

    def save_round(self, e: Engine, mode: str, round_: int, prompts) -> dict:
        before = vars(e.c.save_stats).copy()
        for i, p in enumerate(prompts):
            e.sched.add_request(H.make_request(f"s{round_}-{i}", p, max_tokens=1, block_size=BLOCK_TOKENS))
        t = time.perf_counter()
        drain(e.sched, e.worker, 8 * len(prompts) + 8)
        steps = time.perf_counter() - t
        # The store runs off the step; the loads need it done.
        t = time.perf_counter()
        e.c.flush_saves()
        flush = time.perf_counter() - t
        out = e.clock.take()
        want = len(prompts) * self.a.prefix_blocks
        if out["bytes"] != want * self.block_bytes:
            raise Broken(f"{mode}: the scheduler planned {out['bytes'] // self.block_bytes} block saves, not {want}")
        for k, v in vars(e.c.save_stats).items():
            out[f"{k}_blocks"] = v - before[k]
        out["steps_seconds"] = steps
        out["flush_seconds"] = flush
        return out

    def load_round(self, e: Engine, mode: str, round_: int, prompts) -> dict:
        ids = [f"l{round_}-{i}" for i in range(len(prompts))]
        for rid, p in zip(ids, prompts):
            e.sched.add_request(H.make_request(rid, p, max_tokens=1, block_size=BLOCK_TOKENS))
        # Every request is scheduled in the first step (sync loads), so its
        # block ids are read before it finishes and frees them.
        first = len(e.worker.history)
        res = H.step(e.sched, e.worker)
        got = {n.req_id: (n.num_computed_tokens, list(n.block_ids[0])) for n in res.scheduler_output.scheduled_new_reqs}
        want_tokens = self.a.prefix_blocks * BLOCK_TOKENS
        for rid in ids:
            if rid not in got:
                raise Broken(f"{mode}: {rid} was not scheduled in the first step")
            if got[rid][0] != want_tokens:
                raise Broken(f"{mode}: {rid} matched {got[rid][0]} tokens, not the {want_tokens} saved")
        bad = [r.kv_connector_output.invalid_block_ids for r in e.worker.history[first:] if r.kv_connector_output]
        if any(bad):
            raise Broken(f"{mode}: loads reported invalid blocks {bad}")
        # The loaded KV is what the saving engine wrote, byte for byte.
        for rid, p in zip(ids, prompts):
            block_ids = got[rid][1]
            for li, name in enumerate(e.worker.layer_names):
                have = H.read_kv(e.worker.kv_caches[name], block_ids, want_tokens)
                want = H.expected_kv(li, p[:want_tokens], range(want_tokens), self.a.kv_heads, self.a.head_dim)
                if not torch.equal(have, want):
                    raise Broken(f"{mode}: {rid} {name}: loaded KV differs from the saved KV")
        drain(e.sched, e.worker, 8)
        out = e.clock.take()
        out["verified_blocks"] = len(prompts) * self.a.prefix_blocks
        return out

    def lookup(self, sched, prompt) -> dict:
        """The scheduler connector's `get_num_new_matched_tokens` for a
        present `prefix_blocks` prefix (what each new request costs the
        scheduler before its first step), and the store's own `lookup` of
        the same keys beside it (the rest is the connector's key making)."""
        conn = sched.connector
        req = H.make_request("lookup", prompt, max_tokens=1, block_size=BLOCK_TOKENS)
        want = self.a.prefix_blocks * BLOCK_TOKENS
        keys = kv.request_keys(conn._ns_id, req.block_hashes[: self.a.prefix_blocks])
        connector, store = [], []
        end = time.monotonic() + self.a.lookup_seconds
        while len(connector) < self.a.lookups and time.monotonic() < end:
            t = time.perf_counter()
            hit, _ = conn.get_num_new_matched_tokens(req, 0)
            connector.append((time.perf_counter() - t) * 1e6)
            if hit != want:
                raise Broken(f"lookup of a present {self.a.prefix_blocks}-block prefix: {hit} tokens, not {want}")
            t = time.perf_counter()
            blocks, _ = conn._store.lookup(conn._ns_id, keys)
            store.append((time.perf_counter() - t) * 1e6)
            if blocks != self.a.prefix_blocks:
                raise Broken(f"store lookup of a present prefix found {blocks} blocks, not {self.a.prefix_blocks}")
        return {
            "prefix_blocks": self.a.prefix_blocks,
            "count": len(connector),
            "p50_us": percentile(connector, 50),
            "p99_us": percentile(connector, 99),
            "store_p50_us": percentile(store, 50),
            "store_p99_us": percentile(store, 99),
        }

    def mode(self, mode: str) -> dict:
        # Two engines sharing the store: one saves each round's prompts,
        # the other (which never computed them) loads them.
        saver, loader = Engine(self, mode, "save"), Engine(self, mode, "load")
        try:
            rounds = []
            for r in range(self.a.rounds):
                prompts = self.prompts(mode, r)
                save = self.save_round(saver, mode, r, prompts)
                load = self.load_round(loader, mode, r, prompts)
                rounds.append({"save": save, "load": load})
            # Every round's blocks are in the store now.
            lookup = self.lookup(loader.sched, self.prompts(mode, 0)[0])
        finally:
            saver.close()
            loader.close()
        return {"rounds": rounds, "lookup": lookup}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", default="embedded,daemon")
    ap.add_argument("--endpoint", default=None)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--prefix-blocks", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lookups", type=int, default=2000)
    ap.add_argument("--lookup-seconds", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    if any(m not in MODES for m in modes):
        ap.error(f"--modes: each of {MODES}")
    if "daemon" in modes and not a.endpoint:
        ap.error("daemon mode needs --endpoint")
    tmp = tempfile.TemporaryDirectory(prefix="kvtier-connector-bench-")
    b = Bench(a, tmp.name)
    out = {
        "vllm": vllm.__version__,
        "kvtier_vllm": kv.__file__,
        "model": {
            "layers": a.layers,
            "kv_heads": a.kv_heads,
            "head_dim": a.head_dim,
            "block_tokens": BLOCK_TOKENS,
            "dtype": "f16",
            "block_bytes": b.block_bytes,
        },
        "requests": a.requests,
        "prefix_blocks": a.prefix_blocks,
        "rounds": a.rounds,
    }
    try:
        for m in modes:
            out[m] = b.mode(m)
    except Broken as e:
        print(f"connector_bench.py: broken invariant: {e}", file=sys.stderr)
        sys.exit(1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
