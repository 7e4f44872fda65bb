"""kvtier.dynamo_hashes against NVIDIA Dynamo's own code: the real
ai-dynamo-runtime wheel (1.6.1), no reimplementation of its scheme.

Block hashes come from ``dynamo._core.compute_block_hash_for_seq``. Sequence
hashes come from Dynamo's KV router: a ``KvRouter`` without KV events records
each routed request in its approximate indexer under the sequence hashes it
computes, and ``dump_events()`` hands them back with each block's hash.
"""

import asyncio
import json
import random

import pytest

import kvtier
from dynamo._core import (
    DistributedRuntime,
    KvRouter,
    KvRouterConfig,
    ModelInput,
    ModelRuntimeConfig,
    ModelType,
    WorkerType,
    compute_block_hash_for_seq,
    register_model,
)

U32_MAX = 2**32 - 1
BLOCK_SIZES = (1, 4, 16, 64)
# (lora_name, cache_namespace) cases; empty strings count as absent.
NAMES = [(None, None), ("a", None), (None, "ns"), ("a", "ns"), ("", ""), ("adapter-7/x", "tenant:42")]

# Tokens 1..8 in blocks of 4: block hashes from the wheel, sequence hashes
# from its router (the values kvtier/core/src/block/hash.rs pins).
PINNED = {
    (None, None): ([14643705804678351452, 16777012769546811212], [14643705804678351452, 4945711292740353085]),
    ("a", None): ([17680866786467819158, 10751596618610180438], [17680866786467819158, 17623755234134148274]),
    (None, "ns"): ([10036811808434060891, 1735356409867884788], [10036811808434060891, 16023685679671658249]),
    ("a", "ns"): ([3005469429571855825, 6995127330286721888], [3005469429571855825, 11567378840923356590]),
}


def dynamo_block_hashes(tokens, block_size, lora_name, cache_namespace):
    return compute_block_hash_for_seq(tokens, block_size, lora_name=lora_name, cache_namespace=cache_namespace)


@pytest.mark.parametrize("names", list(PINNED), ids=str)
def test_pinned_vectors(names):
    lora_name, cache_namespace = names
    blocks, seqs = PINNED[names]
    tokens = list(range(1, 9))
    assert dynamo_block_hashes(tokens, 4, lora_name, cache_namespace) == blocks
    assert kvtier.dynamo_hashes(tokens, 4, lora_name=lora_name, cache_namespace=cache_namespace) == (blocks, seqs)


def random_cases(seed, count):
    rng = random.Random(seed)
    for i in range(count):
        block_size = BLOCK_SIZES[i % len(BLOCK_SIZES)]
        # Lengths from below one block to several, with partial tails.
        n = rng.randrange(0, 6 * block_size + block_size)
        high = rng.choice([100, 50_000, U32_MAX])
        tokens = [rng.randint(0, high) for _ in range(n)]
        yield i, tokens, block_size, *rng.choice(NAMES)


def test_block_hashes_match_dynamo_on_random_sequences():
    seed = 20250611
    for i, tokens, block_size, lora_name, cache_namespace in random_cases(seed, 200):
        want = dynamo_block_hashes(tokens, block_size, lora_name, cache_namespace)
        blocks, seqs = kvtier.dynamo_hashes(tokens, block_size, lora_name, cache_namespace)
        where = f"seed {seed}, case {i}: {len(tokens)} tokens, block_size {block_size}, {lora_name!r}, {cache_namespace!r}"
        assert blocks == want, where
        assert len(seqs) == len(tokens) // block_size, where


async def _route_and_dump(cases, deadline_s=30.0):
    """Routes every case through a real KvRouter (one per block size) and
    returns {(block_size, sequence hash): (parent sequence hash, block hash)}
    from the routers' indexers, once every expected block is there (or the
    deadline passed)."""
    loop = asyncio.get_running_loop()
    runtime = DistributedRuntime(loop, "mem", "tcp", event_plane="zmq")

    async def handler(request, context=None):
        yield {"token_ids": [], "finish_reason": "stop"}

    serving, routers = [], {}
    try:
        for block_size in sorted({c[1] for c in cases}):
            endpoint = runtime.endpoint(f"kvtier.worker{block_size}.generate")
            serving.append(asyncio.ensure_future(endpoint.serve_endpoint(handler)))
            config = ModelRuntimeConfig()
            config.total_kv_blocks = 1 << 16
            config.max_num_seqs = 64
            config.max_num_batched_tokens = 1 << 16
            await register_model(
                ModelInput.Tokens,
                ModelType.Completions,
                endpoint,
                f"kvtier-probe-{block_size}",
                f"kvtier-probe-{block_size}",
                worker_type=WorkerType.Aggregated,
                kv_cache_block_size=block_size,
                runtime_config=config,
                skip_model_assets=True,
            )
            routers[block_size] = KvRouter(endpoint, block_size, KvRouterConfig(use_kv_events=False))

        async def best_worker(router, tokens, **names):
            # The router learns of the worker through discovery, shortly
            # after register_model: poll until it has one.
            end = loop.time() + deadline_s
            while True:
                try:
                    return await router.best_worker(tokens, update_indexer=True, **names)
                except Exception as e:
                    if "no endpoints" not in str(e) or loop.time() > end:
                        raise
                await asyncio.sleep(0.05)

        expected = set()
        for tokens, block_size, lora_name, cache_namespace, seqs in cases:
            await best_worker(routers[block_size], tokens, lora_name=lora_name, cache_namespace=cache_namespace)
            expected.update((block_size, s) for s in seqs)

        end = loop.time() + deadline_s
        while True:
            stored = {}
            for block_size, router in routers.items():
                for event in json.loads(await router.dump_events()):
                    data = event["event"]["data"].get("stored")
                    if data is None:
                        continue
                    parent = data["parent_hash"]
                    for block in data["blocks"]:
                        stored[(block_size, block["block_hash"])] = (parent, block["tokens_hash"])
                        parent = block["block_hash"]
            if expected <= stored.keys() or loop.time() > end:
                return stored
            await asyncio.sleep(0.05)
    finally:
        runtime.shutdown()
        for task in serving:
            try:
                await asyncio.wait_for(task, 10)
            except Exception:
                pass


def test_sequence_hashes_match_dynamos_router():
    seed = 7340
    cases = []
    # Requests may share prefixes: a sequence hash names its whole prefix,
    # so a shared block has the same parent and block hash in each.
    for _, tokens, block_size, lora_name, cache_namespace in random_cases(seed, 64):
        if len(tokens) >= block_size:
            _, seqs = kvtier.dynamo_hashes(tokens, block_size, lora_name, cache_namespace)
            cases.append((tokens, block_size, lora_name, cache_namespace, seqs))
    cases += [(list(range(1, 9)), 4, lora, ns, PINNED[(lora, ns)][1]) for lora, ns in PINNED]
    stored = asyncio.run(_route_and_dump(cases))
    for i, (tokens, block_size, lora_name, cache_namespace, seqs) in enumerate(cases):
        blocks, _ = kvtier.dynamo_hashes(tokens, block_size, lora_name, cache_namespace)
        where = f"seed {seed}, case {i}: {len(tokens)} tokens, block_size {block_size}, {lora_name!r}, {cache_namespace!r}"
        parent = None
        for j, (block_hash, seq) in enumerate(zip(blocks, seqs)):
            assert (block_size, seq) in stored, f"{where}: block {j}'s sequence hash {seq} is not in the router"
            assert stored[(block_size, seq)] == (parent, block_hash), f"{where}: block {j}"
            parent = seq


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match=r"^block_size is 0, a block holds at least one token$"):
        kvtier.dynamo_hashes([1, 2, 3], 0)
    with pytest.raises(ValueError, match=r"^block_size is -4, not in 0\.\.=4294967295$"):
        kvtier.dynamo_hashes([1, 2, 3], -4)
    with pytest.raises(ValueError, match=r"^tokens\[1\] is -1, not in 0\.\.=4294967295$"):
        kvtier.dynamo_hashes([1, -1, 3], 2)
    with pytest.raises(ValueError, match=r"^tokens\[2\] is 4294967296, not in 0\.\.=4294967295$"):
        kvtier.dynamo_hashes([1, 2, 2**32], 2)
    with pytest.raises(ValueError, match=r"^tokens\[0\] is 340282366920938463463374607431768211456, not in"):
        kvtier.dynamo_hashes([2**128], 2)
    with pytest.raises(TypeError, match=r"^tokens\[0\] must be an int, got float$"):
        kvtier.dynamo_hashes([1.0], 2)
    # Only full blocks are hashed; the largest token id is one.
    assert kvtier.dynamo_hashes([U32_MAX] * 3, 2)[0] == dynamo_block_hashes([U32_MAX] * 3, 2, None, None)
    assert kvtier.dynamo_hashes([1, 2, 3], 4) == ([], [])
