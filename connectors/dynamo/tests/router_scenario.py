"""kvtier's tier events through NVIDIA Dynamo's real KV router, on a CPU.

Run by test_router.py inside a network namespace it creates (only ``lo``
up), because Dynamo's event plane and request plane bind the machine's
own address. Two roles:

- ``worker``: one engine. vLLM's real scheduler (the CPU harness of
  connectors/vllm/tests) with kvtier's connector (embedded store: a small
  host-RAM tier in front of an SSD tier) and vLLM's ZMQ KV-event publisher
  on 127.0.0.1; Dynamo's ``KvEventPublisher`` relays that publisher to the
  router, as ``python -m dynamo.vllm`` does; the worker is registered in
  Dynamo's discovery (file backend) like a vLLM worker. It takes commands
  as JSON lines on stdin and answers on stdout.
- ``driver``: starts two workers, builds Dynamo's ``KvRouter`` over them,
  drives the scenario and prints what the router said, as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[2]
BLOCK = 16
sys.path.insert(0, str(ROOT / "python" / "tests"))
from kvtier_testkit import free_port, lo_up  # noqa: E402
COMPONENT = "kvtier.worker.generate"


def interfaces() -> list[str]:
    """The network interfaces of this process's namespace."""
    import socket

    return sorted(name for _, name in socket.if_nameindex())


# ------------------------------------------------------------------ worker


def worker(args) -> None:
    sys.path.insert(0, str(ROOT / "connectors" / "vllm" / "tests"))
    import vllm_harness as H
    from vllm.config import KVEventsConfig

    import kvtier.vllm as kv

    block_bytes = 2 * 2 * 2 * 64 * BLOCK * 2  # layers, K/V, kv heads, head dim, tokens, f16
    extra = {
        "host_capacity_bytes": args.host_blocks * block_bytes,
        "disk_dir": args.store_dir,
        "tier_events": "auto",
    }
    ev = KVEventsConfig(
        enable_kv_cache_events=True, publisher="zmq", endpoint=f"tcp://*:{args.zmq_port}"
    )
    vc = H.make_vllm_config(
        args.model_dir, "KvTierConnector", "kvtier.vllm", extra, num_gpu_blocks=args.gpu_blocks, max_model_len=128,
        kv_events_config=ev,
    )
    kcc = H.make_kv_cache_config(vc)
    sched = H.make_scheduler(vc, kcc)
    eng = H.make_worker(vc, kcc)
    requests = {}

    def settle():
        """Saves stored, the feed read, and one more step so the scheduler
        takes the connector's events and publishes them."""
        eng.connector.flush_saves()
        if sched.connector._events is not None:
            sched.connector._events.flush()
        H.step(sched, eng)

    def serve(req_id, tokens):
        req = H.make_request(req_id, tokens, max_tokens=1)
        requests[req_id] = req
        sched.add_request(req)
        H.run_until_finished(sched, eng, [req_id], max_steps=40)
        settle()

    def delete(req_id):
        req = requests[req_id]
        n = len(req.prompt_token_ids) // BLOCK
        keys = kv.request_keys(sched.connector._ns_id, req.block_hashes[:n])
        store = sched.connector._store
        deleted = store.delete(sched.connector._ns_id, keys)
        settle()
        return deleted

    async def main():
        from dynamo._core import (
            DistributedRuntime,
            KvEventPublisher,
            ModelInput,
            ModelRuntimeConfig,
            ModelType,
            WorkerType,
            register_model,
        )

        loop = asyncio.get_running_loop()
        drt = DistributedRuntime(loop, "file", "tcp", event_plane="zmq")
        ep = drt.endpoint(COMPONENT)

        async def generate(request, context=None):
            yield {"token_ids": [1], "finish_reason": "stop"}

        serving = asyncio.ensure_future(ep.serve_endpoint(generate))
        rc = ModelRuntimeConfig()
        rc.total_kv_blocks = args.gpu_blocks
        rc.max_num_seqs = 16
        rc.max_num_batched_tokens = 256
        rc.kv_event_publishing_enabled = True
        await register_model(
            ModelInput.Tokens, ModelType.Completions, ep, args.model_dir, "tiny",
            worker_type=WorkerType.Aggregated, kv_cache_block_size=BLOCK, runtime_config=rc,
            skip_model_assets=True,
        )
        relay = KvEventPublisher(ep, kv_block_size=BLOCK, zmq_endpoint=f"tcp://127.0.0.1:{args.zmq_port}")
        print(json.dumps({"ready": ep.connection_id()}), flush=True)
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            line = await reader.readline()
            if not line:
                break
            cmd = json.loads(line)
            if cmd["op"] == "serve":
                await asyncio.to_thread(serve, cmd["id"], cmd["tokens"])
                out = {"ok": True}
            elif cmd["op"] == "delete":
                out = {"ok": True, "deleted": await asyncio.to_thread(delete, cmd["id"])}
            elif cmd["op"] == "stop":
                break
            else:
                out = {"ok": False, "error": f"unknown op {cmd['op']!r}"}
            print(json.dumps(out), flush=True)
        relay.shutdown()
        serving.cancel()
        drt.shutdown()

    asyncio.run(main())
    os._exit(0)


# ------------------------------------------------------------------ driver


class Worker:
    def __init__(self, name, args, zmq_port, tmp):
        cmd = [
            sys.executable, __file__, "worker", "--zmq-port", str(zmq_port), "--model-dir", args.model_dir,
            "--store-dir", str(tmp / f"store-{name}"), "--gpu-blocks", str(args.gpu_blocks),
            "--host-blocks", str(args.host_blocks),
        ]
        self.log = open(tmp / f"worker-{name}.log", "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.id = self.read(180)["ready"]

    def read(self, timeout_s):
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if sel.select(timeout=max(0.0, end - time.monotonic())):
                line = self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"worker exited ({self.proc.wait()}); see {self.log.name}")
                if line.startswith("{"):
                    return json.loads(line)
        raise TimeoutError(f"worker did not answer within {timeout_s} s; see {self.log.name}")

    def call(self, timeout_s=120, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        out = self.read(timeout_s)
        if not out.get("ok"):
            raise RuntimeError(f"worker: {out}")
        return out

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=20)
            except Exception:  # noqa: BLE001
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def driver(args) -> None:
    import tempfile

    if args.netns:
        lo_up()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="kvtier-router-"))
    os.environ["DYN_FILE_KV"] = str(tmp / "discovery")
    os.environ.setdefault("DYN_LOG", "warn")
    result = {"interfaces": interfaces()}
    workers = {}
    try:
        for name in ("A", "B"):
            workers[name] = Worker(name, args, free_port(), tmp)
        result["workers"] = {n: w.id for n, w in workers.items()}
        result.update(asyncio.run(scenario(workers)))
    finally:
        for w in workers.values():
            w.stop()
    print(json.dumps(result), flush=True)


def prompt(seed: int, blocks: int) -> list[int]:
    return [4 + (seed * 37 + t) % 250 for t in range(blocks * BLOCK)] + [5]


async def scenario(workers) -> dict:
    from dynamo._core import DistributedRuntime, KvRouter, KvRouterConfig

    loop = asyncio.get_running_loop()
    drt = DistributedRuntime(loop, "file", "tcp", event_plane="zmq")
    router = KvRouter(drt.endpoint(COMPONENT), BLOCK, KvRouterConfig())
    a, b = workers["A"], workers["B"]
    p = prompt(1, 3)
    out = {}

    async def rows(tokens):
        s = await router.get_overlap_scores(tokens)
        return {r["worker_id"]: r for r in s["workers"]}

    async def until(what, pred, timeout_s=60):
        end = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < end:
            last = await rows(p)
            if pred(last):
                return last
            await asyncio.sleep(0.2)
        raise TimeoutError(f"router never showed {what}: {last}")

    def tiers(r, w):
        row = r.get(w.id, {})
        return [row.get(k, 0) for k in ("device_blocks", "host_pinned_blocks", "disk_blocks")]

    await until("both workers", lambda r: a.id in r and b.id in r)
    # A serves the prompt: its GPU cache and kvtier's host tier hold 3 blocks.
    await asyncio.to_thread(a.call, op="serve", id="p", tokens=p)
    out["after_serve"] = {"A": tiers(await until("A's host tier", lambda r: tiers(r, a)[1] >= 3), a)}
    out["after_serve"]["B"] = tiers(await rows(p), b)
    # A serves other prompts: its GPU evicts the prefix, kvtier's host tier
    # (4 blocks) demotes it to the SSD; the router still sees it there.
    for i in range(4):
        await asyncio.to_thread(a.call, op="serve", id=f"f{i}", tokens=prompt(10 + i, 3))
    r = await until("the prefix on A's SSD only", lambda r: tiers(r, a)[0] == 0 and tiers(r, a)[2] >= 3)
    out["after_gpu_evict"] = {"A": tiers(r, a), "B": tiers(r, b)}
    # Both idle: the router sends the prefix to the worker whose kvtier holds it.
    out["best_worker"] = list(await router.best_worker(p))
    loads = await router.get_potential_loads(p)
    out["potential_prefill_tokens"] = {
        ("A" if x["worker_id"] == a.id else "B"): x["potential_prefill_tokens"] for x in loads
    }
    # kvtier drops the blocks: BlockRemoved takes them out of the router.
    await asyncio.to_thread(a.call, op="delete", id="p")
    r = await until("the prefix gone from A", lambda r: tiers(r, a) == [0, 0, 0])
    out["after_delete"] = {"A": tiers(r, a), "B": tiers(r, b)}
    drt.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["driver", "worker"])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--zmq-port", type=int)
    ap.add_argument("--store-dir")
    ap.add_argument("--gpu-blocks", type=int, default=9)
    ap.add_argument("--host-blocks", type=int, default=4)
    ap.add_argument("--netns", action="store_true", help="bring lo up first (run under unshare -n)")
    args = ap.parse_args()
    if args.role == "worker":
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
