"""The LMCache half of ``kvtier-bench lmcache``: one side of the comparison
(kvtier as LMCache's L2, through kvtierd or embedded in this process, or
one of LMCache's own disk L2 adapters), driven
through LMCache 0.5.6's own L2 machinery, as ``lmcache server
--l2-adapter JSON`` builds it (``parse_args_to_l2_adapters_config`` +
``create_l2_adapter``), with real ``TensorMemoryObj`` chunks on CPU.

One run puts ``--chunks`` chunks of ``--chunk-bytes`` (new keys), flushes
and drops the page cache, then gets every chunk back in a shuffled order.
Each phase keeps ``--in-flight`` tasks of ``--batch`` chunks outstanding
(a new task is submitted as soon as one completes) and times every task
from its submit to the moment its completion is seen on the adapter's
event fd. Prints one JSON object of raw seconds, bytes, CPU seconds and
every task's latency; ``kvtier-bench lmcache`` turns them into figures.

Memory stays bounded whatever the working set: chunks are put from
``in_flight * batch`` page-aligned source buffers (as LMCache's L1 is
4 KiB aligned), each of its own random bytes, with the chunk's number
written into its first and last 16 bytes before each put; gets land in as
many destination buffers. Every chunk's two headers are checked after its
get, and every ``--verify-every``-th chunk is compared byte for byte with
the buffer it was put from; a wrong byte, a short load or a failed store
fails the run. Every wait is bounded (``--deadline-s`` for the whole run).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import select
import shutil
import sys
import time

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lmcache.v1.distributed.api import ObjectKey  # noqa: E402
from lmcache.v1.distributed.l2_adapters import create_l2_adapter  # noqa: E402
from lmcache.v1.distributed.l2_adapters.config import parse_args_to_l2_adapters_config  # noqa: E402
from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj  # noqa: E402
from lmcache.v1.platform import consume_fd  # noqa: E402

PAGE = 4096
HEADER = 16
MODEL = "meta-llama/Llama-3.1-8B"
# The longest one wait for a completion may take before the run fails.
WAIT_MAX_S = 120.0


def adapter_spec(a) -> dict:
    """The `--l2-adapter` JSON of the side under test."""
    if a.side == "kvtier":
        return {
            "type": "native_plugin",
            "module_path": "kvtier.lmcache",
            "class_name": "KvTierL2",
            "adapter_params": {"chunk_bytes": a.chunk_bytes, "endpoint": a.endpoint},
            "max_capacity_gb": 0,
        }
    if a.side == "kvtier_embedded":
        return {
            "type": "native_plugin",
            "module_path": "kvtier.lmcache",
            "class_name": "KvTierL2",
            "adapter_params": {"chunk_bytes": a.chunk_bytes, "disk_dir": a.dir, "disk_capacity_bytes": a.disk_capacity_bytes},
            "max_capacity_gb": 0,
        }
    if a.side == "fs":
        return {"type": "fs", "base_path": a.dir, "use_odirect": a.odirect}
    if a.side == "fs_native":
        return {"type": "fs_native", "base_path": a.dir, "use_odirect": a.odirect}
    raise SystemExit(f"unknown side {a.side}")


def aligned(nbytes: int) -> torch.Tensor:
    """A page-aligned uint8 tensor of `nbytes` (LMCache's L1 default alignment)."""
    backing = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    off = (-backing.data_ptr()) % PAGE
    t = backing[off : off + nbytes]
    assert t.data_ptr() % PAGE == 0, "buffer not page-aligned"
    return t


def memory_objects(buf: torch.Tensor, n: int, size: int) -> list:
    out = []
    for i in range(n):
        meta = MemoryObjMetadata(
            shape=torch.Size([size]), dtype=torch.uint8, address=i * size,
            phy_size=size, fmt=MemoryFormat.KV_2LTD, ref_count=1,
        )
        out.append(TensorMemoryObj(raw_data=buf[i * size : (i + 1) * size], metadata=meta, parent_allocator=None))
    return out


def header(chunk: int, nonce: int) -> torch.Tensor:
    return torch.from_numpy(np.array([chunk, nonce], dtype="<u8").view(np.uint8).copy())


def key(chunk: int, nonce: int) -> ObjectKey:
    h = (nonce << 64 | chunk).to_bytes(16, "big")
    return ObjectKey(chunk_hash=h, model_name=MODEL, kv_rank=0)


def drop_page_cache(dirs: list[str]) -> dict:
    """Flushes dirty pages (timed: what a buffered put left to write) and
    drops the clean ones, so a get reads the device: drop_caches when
    allowed (root), else POSIX_FADV_DONTNEED on every file under `dirs`."""
    t = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - t
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1")
        return {"sync_s": sync_s, "page_cache_dropped": True, "drop_method": "sync; echo 1 > /proc/sys/vm/drop_caches"}
    except OSError:
        pass
    dropped, failed = 0, 0
    for d in dirs:
        for root, _, files in os.walk(d):
            for name in files:
                try:
                    fd = os.open(os.path.join(root, name), os.O_RDONLY)
                    try:
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                        dropped += 1
                    finally:
                        os.close(fd)
                except OSError:
                    failed += 1
    return {
        "sync_s": sync_s,
        "page_cache_dropped": failed == 0,
        "drop_method": f"sync; posix_fadvise(DONTNEED) on {dropped} files ({failed} failed)",
    }


def cpu_s(daemon_pid: int) -> float:
    """CPU seconds (user + system) of this process, all its threads (the
    adapter's and the L2's), and of kvtierd when it serves this side."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    total = ru.ru_utime + ru.ru_stime
    if daemon_pid:
        with open(f"/proc/{daemon_pid}/stat") as f:
            # Fields after the command's closing parenthesis; utime, stime are 14, 15.
            rest = f.read().rsplit(")", 1)[1].split()
        total += (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")
    return total


class Phase:
    """One closed loop of `in_flight` outstanding tasks over `batches`."""

    def __init__(self, adapter, op: str, deadline: float):
        self.a = adapter
        self.op = op
        self.deadline = deadline
        self.fd = adapter.get_store_event_fd() if op == "put" else adapter.get_load_event_fd()
        self.poll = select.poll()
        self.poll.register(self.fd, select.POLLIN)

    def submit(self, keys, objs) -> int:
        if self.op == "put":
            return self.a.submit_store_task(keys, objs)
        return self.a.submit_load_task(keys, objs)

    def completed(self, pending: dict) -> list[tuple[int, object]]:
        """Waits for the event fd, then returns the finished (task, result) pairs."""
        left_ms = int(max(0.0, min(WAIT_MAX_S, self.deadline - time.monotonic())) * 1000)
        if not self.poll.poll(left_ms):
            raise SystemExit(
                f"{self.op}: no completion within {left_ms / 1000:.0f} s ({len(pending)} tasks pending)"
            )
        consume_fd(self.fd)
        if self.op == "put":
            return list(self.a.pop_completed_store_tasks().items())
        out = []
        for tid in list(pending):
            bm = self.a.query_load_result(tid)
            if bm is not None:
                out.append((tid, bm))
        return out

    def run(self, batches: list[list[int]], on_submit, on_done, in_flight: int) -> tuple[float, list[float]]:
        """Submits every batch, at most `in_flight` at once; returns the
        phase's seconds and each task's latency in seconds."""
        free = list(range(in_flight))
        pending: dict[int, tuple[float, int, list[int]]] = {}
        lat: list[float] = []
        nxt = 0
        t0 = time.perf_counter()
        while nxt < len(batches) or pending:
            if time.monotonic() > self.deadline:
                raise SystemExit(f"{self.op}: past the run's deadline")
            while free and nxt < len(batches):
                slot = free.pop()
                chunks = batches[nxt]
                keys, objs = on_submit(slot, chunks)
                t = time.perf_counter()
                pending[self.submit(keys, objs)] = (t, slot, chunks)
                nxt += 1
            for tid, result in self.completed(pending):
                if tid not in pending:
                    raise SystemExit(f"{self.op}: completion of unknown task {tid}")
                t, slot, chunks = pending.pop(tid)
                lat.append(time.perf_counter() - t)
                on_done(slot, chunks, result)
                free.append(slot)
        return time.perf_counter() - t0, lat


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", required=True, choices=["kvtier", "kvtier_embedded", "fs", "fs_native"])
    p.add_argument("--endpoint", default="", help="kvtierd (side kvtier)")
    p.add_argument("--dir", default="", help="LMCache's base_path, or kvtier's disk_dir (side kvtier_embedded)")
    p.add_argument("--disk-capacity-bytes", type=int, default=0, help="side kvtier_embedded")
    p.add_argument("--odirect", action="store_true", help="LMCache's use_odirect")
    p.add_argument("--chunk-bytes", type=int, required=True)
    p.add_argument("--chunks", type=int, required=True)
    p.add_argument("--in-flight", type=int, default=4)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--verify-every", type=int, default=8)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--deadline-s", type=float, default=600.0)
    p.add_argument("--daemon-pid", type=int, default=0, help="kvtierd's pid, for its CPU time")
    p.add_argument("--drop-dirs", nargs="*", default=[], help="directories whose page cache is dropped")
    a = p.parse_args()
    deadline = time.monotonic() + a.deadline_s
    size, n = a.chunk_bytes, a.chunks
    if size % PAGE or size < 2 * HEADER or n < 1 or a.in_flight < 1 or a.batch < 1 or a.verify_every < 1:
        raise SystemExit("chunk bytes a multiple of 4 KiB; chunks, in-flight, batch, verify-every at least 1")
    slots = a.in_flight
    per = a.batch
    nonce = a.seed

    spec = adapter_spec(a)
    cfg = parse_args_to_l2_adapters_config(argparse.Namespace(l2_adapter=[json.dumps(spec)]))
    adapter = create_l2_adapter(cfg.adapters[0])

    # Source buffers: random bytes of their own each (a chunk from the wrong
    # buffer fails the byte compare), the chunk number in the headers.
    src_buf = aligned(slots * per * size)
    rng = np.random.default_rng(a.seed)
    for i in range(slots * per):
        src_buf[i * size : (i + 1) * size].copy_(torch.from_numpy(np.frombuffer(bytearray(rng.bytes(size)), dtype=np.uint8)))
    src = [memory_objects(src_buf[s * per * size : (s + 1) * per * size], per, size) for s in range(slots)]
    dst_buf = aligned(slots * per * size)
    dst_buf.zero_()
    dst = [memory_objects(dst_buf[s * per * size : (s + 1) * per * size], per, size) for s in range(slots)]

    order = list(range(n))
    put_batches = [order[i : i + per] for i in range(0, n, per)]
    # Which source buffer each chunk was put from.
    put_from: dict[int, tuple[int, int]] = {}
    failed_puts: list[str] = []

    def put_submit(slot, chunks):
        objs = src[slot][: len(chunks)]
        for j, c in enumerate(chunks):
            h = header(c, nonce)
            objs[j].raw_data[:HEADER].copy_(h)
            objs[j].raw_data[-HEADER:].copy_(h)
            put_from[c] = (slot, j)
        return [key(c, nonce) for c in chunks], objs

    def put_done(slot, chunks, result):
        if not result.is_successful():
            failed_puts.append(f"chunks {chunks}: {result}")

    c0 = cpu_s(a.daemon_pid)
    put_s, put_lat = Phase(adapter, "put", deadline).run(put_batches, put_submit, put_done, slots)
    put_cpu_s = cpu_s(a.daemon_pid) - c0
    if failed_puts:
        raise SystemExit(f"put failed: {failed_puts[:3]}")

    drop = drop_page_cache(a.drop_dirs)

    shuffled = list(range(n))
    random.Random(a.seed).shuffle(shuffled)
    get_batches = [shuffled[i : i + per] for i in range(0, n, per)]
    verified = {"headers": 0, "full": 0}
    bad: list[str] = []

    def get_submit(slot, chunks):
        objs = dst[slot][: len(chunks)]
        for o, c in zip(objs, chunks):
            # A load that claims a chunk without writing it leaves stale headers.
            o.raw_data[:HEADER].zero_()
            o.raw_data[-HEADER:].zero_()
            if c % a.verify_every == 0:
                o.raw_data.zero_()
        return [key(c, nonce) for c in chunks], objs

    def get_done(slot, chunks, bitmap):
        objs = dst[slot][: len(chunks)]
        for j, (o, c) in enumerate(zip(objs, chunks)):
            if not bitmap.test(j):
                bad.append(f"chunk {c}: not loaded")
                continue
            h = header(c, nonce)
            if not (torch.equal(o.raw_data[:HEADER], h) and torch.equal(o.raw_data[-HEADER:], h)):
                bad.append(f"chunk {c}: headers are not chunk {c}'s")
                continue
            verified["headers"] += 1
            if c % a.verify_every == 0:
                s, k = put_from[c]
                want = src[s][k].raw_data[HEADER:-HEADER].numpy()
                if not np.array_equal(o.raw_data[HEADER:-HEADER].numpy(), want):
                    bad.append(f"chunk {c}: bytes differ from those put")
                    continue
                verified["full"] += 1

    c0 = cpu_s(a.daemon_pid)
    get_s, get_lat = Phase(adapter, "get", deadline).run(get_batches, get_submit, get_done, slots)
    get_cpu_s = cpu_s(a.daemon_pid) - c0
    if bad:
        raise SystemExit(f"get: {len(bad)} chunks wrong, first: {bad[:3]}")
    status = adapter.report_status()
    # KvTierL2 says how its bytes moved: shared-memory regions, the socket, or embedded.
    l2 = getattr(adapter, "_client", None)
    transport = l2.transport() if hasattr(l2, "transport") else None
    adapter.close()
    if a.dir:
        shutil.rmtree(a.dir, ignore_errors=True)

    import lmcache

    print(json.dumps({
        "side": a.side,
        "adapter": spec,
        "kvtier_transport": transport,
        "adapter_status": {k: v for k, v in status.items() if isinstance(v, (str, int, float, bool))},
        "lmcache": getattr(lmcache, "__version__", "unknown"),
        "chunk_bytes": size,
        "chunks": n,
        "bytes": n * size,
        "in_flight": slots,
        "batch": per,
        "put_s": put_s,
        "get_s": get_s,
        "put_tasks": len(put_lat),
        "get_tasks": len(get_lat),
        "put_cpu_s": put_cpu_s,
        "get_cpu_s": get_cpu_s,
        "cores": os.cpu_count(),
        "put_latency_us": [round(x * 1e6, 1) for x in put_lat],
        "get_latency_us": [round(x * 1e6, 1) for x in get_lat],
        "verified_header_chunks": verified["headers"],
        "verified_full_chunks": verified["full"],
        **drop,
    }))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
