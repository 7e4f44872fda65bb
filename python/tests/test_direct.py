"""Blocks straight between an engine's KV tensors and the embedded store
(save_blocks / load_blocks), and a request's keys in one call
(keys_from_hashes).

The tensors are torch CPU tensors laid out as vLLM's KV cache is on the
connector's direct path: per layer (num_blocks, kv_heads, block_tokens,
2 * head_dim), float16, one block contiguous."""

import os
import pathlib

import numpy as np
import pytest
import torch

import kvtier
from conftest import namespace

LAYERS, HEADS, TOKENS, DIM = 2, 2, 16, 64
NUM_BLOCKS = 12
LAYER_BLOCK = HEADS * TOKENS * 2 * DIM * 2  # f16
BLOCK = LAYERS * LAYER_BLOCK  # the namespace's block: 16 KiB


def kv_caches(seed=None):
    """One tensor per layer; random blocks, or zeros."""
    shape = (NUM_BLOCKS, HEADS, TOKENS, 2 * DIM)
    if seed is None:
        return [torch.zeros(shape, dtype=torch.float16) for _ in range(LAYERS)]
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(torch.float16) for _ in range(LAYERS)]


def layers_of(caches):
    return [(t.data_ptr(), t.stride(0) * t.element_size(), t.shape[0]) for t in caches]


def block_of(caches, block_id):
    """kvtier's bytes of one engine block: every layer's, in layer order."""
    return b"".join(t[block_id].numpy().tobytes() for t in caches)


def keys_for(ns_id, n, tag=b""):
    return kvtier.keys_from_hashes(ns_id, [tag + i.to_bytes(32, "little") for i in range(n)])


def save(s, ns_id, keys, caches, ids):
    return s.save_blocks(ns_id, keys, layers_of(caches), LAYER_BLOCK, ids)


def load(s, ns_id, keys, caches, ids):
    return s.load_blocks(ns_id, keys, layers_of(caches), LAYER_BLOCK, ids)


def host_store(blocks=256):
    return kvtier.Store({"host": {"capacity_bytes": blocks * BLOCK}})


def ssd_store(path):
    return kvtier.Store(
        {"mode": "ssd-only", "disk": {"dir": str(path), "capacity_bytes": 16 << 20, "segment_bytes": 1 << 20}}
    )


@pytest.fixture(params=["host", "ssd-only"])
def store(request, tmp_path):
    """A store with a host tier, and one without (saves staged to disk)."""
    s = host_store() if request.param == "host" else ssd_store(tmp_path)
    assert s.has_host_tier() == (request.param == "host")
    return s


def test_save_then_load_into_other_blocks_round_trips(store):
    ns = store.register_namespace(namespace())
    assert store.block_bytes(ns) == BLOCK
    src, dst = kv_caches(1), kv_caches()
    keys = keys_for(ns, 3)
    assert save(store, ns, keys, src, [3, 7, 1]) == {"stored": 3, "present": 0, "not_admitted": 0}
    tier = "host" if store.has_host_tier() else "disk"
    assert store.lookup(ns, keys) == (3, [tier] * 3)
    assert load(store, ns, keys, dst, [0, 5, 9]) == (3, None)
    for s_id, d_id in [(3, 0), (7, 5), (1, 9)]:
        assert block_of(dst, d_id) == block_of(src, s_id)
    # Nothing else in the tensors was written.
    for d_id in set(range(NUM_BLOCKS)) - {0, 5, 9}:
        assert not any(t[d_id].any() for t in dst)
    assert save(store, ns, keys, src, [3, 7, 1]) == {"stored": 0, "present": 3, "not_admitted": 0}


def test_both_paths_share_keys_and_bytes(store):
    """save_blocks stores what _copy_blocks + put stores, under the same keys."""
    ns = store.register_namespace(namespace())
    src = kv_caches(2)
    ids = [4, 0, 11, 5]
    direct, staged = keys_for(ns, 4, b"direct"), keys_for(ns, 4, b"staged")
    save(store, ns, direct, src, ids)
    staging = np.empty(len(ids) * BLOCK, np.uint8)
    kvtier._kvtier._copy_blocks("save", layers_of(src), LAYER_BLOCK, ids, staging)
    assert store.put(ns, staged, staging)["stored"] == 4
    # The direct path's blocks read back through get are the staging bytes.
    out = np.zeros_like(staging)
    assert store.get(ns, direct, out) == (4, None)
    assert out.tobytes() == staging.tobytes()
    # The old path's blocks load straight into the tensors.
    dst = kv_caches()
    assert load(store, ns, staged, dst, [1, 2, 3, 6]) == (4, None)
    for s_id, d_id in zip(ids, [1, 2, 3, 6]):
        assert block_of(dst, d_id) == block_of(src, s_id)
    # Same keys, same content: the direct path finds the old path's blocks.
    assert save(store, ns, staged, src, ids)["present"] == 4


def test_a_miss_loads_the_present_prefix_only(store):
    ns = store.register_namespace(namespace())
    src, dst = kv_caches(3), kv_caches()
    keys = keys_for(ns, 4)
    save(store, ns, [keys[0], keys[1], keys[3]], src, [0, 1, 3])
    assert load(store, ns, keys, dst, [0, 1, 2, 3]) == (2, None)
    assert block_of(dst, 1) == block_of(src, 1)
    assert not any(t[2].any() or t[3].any() for t in dst), "nothing past the miss is written"


def test_evicted_blocks_shorten_the_prefix():
    # A pool of four blocks: saving six evicts the first two (no disk).
    s = host_store(blocks=4)
    ns = s.register_namespace(namespace())
    src, dst = kv_caches(4), kv_caches()
    keys = keys_for(ns, 6)
    assert save(s, ns, keys, src, list(range(6)))["stored"] == 6
    assert s.lookup(ns, keys)[0] == 0
    assert load(s, ns, keys, dst, list(range(6))) == (0, None)
    assert not any(t.any() for t in dst)
    assert load(s, ns, keys[2:], dst, list(range(2, 6))) == (4, None)
    for b in range(2, 6):
        assert block_of(dst, b) == block_of(src, b)
    assert s.stats()["host"]["evictions"] == 2


def corrupt_on_disk(path: pathlib.Path, block: bytes):
    """Flips one byte of `block` in its segment file, behind the store's back."""
    for seg in path.glob("*.seg"):
        raw = seg.read_bytes()
        at = raw.find(block[:64])
        if at >= 0:
            with open(seg, "r+b") as f:
                f.seek(at)
                f.write(bytes([raw[at] ^ 1]))
            return
    raise AssertionError("block not found on disk")


def test_a_corrupt_block_is_never_written_into_the_tensors(tmp_path):
    s = ssd_store(tmp_path)
    ns = s.register_namespace(namespace())
    src, dst = kv_caches(5), kv_caches()
    keys = keys_for(ns, 3)
    save(s, ns, keys, src, [0, 1, 2])
    corrupt_on_disk(tmp_path, block_of(src, 1))
    # Sentinel bytes where block 1 would land: they must survive.
    for t in dst:
        t[7].fill_(1.0)
    sentinel = block_of(dst, 7)
    assert load(s, ns, keys, dst, [6, 7, 8]) == (1, 1)
    assert block_of(dst, 6) == block_of(src, 0)
    assert block_of(dst, 7) == sentinel, "a corrupt block reached the tensors"
    assert not any(t[8].any() for t in dst)
    stats = s.stats()
    assert stats["disk"]["corrupt"] == 1
    assert stats["load_failures"] == 1
    # Never served again: the prefix ends before it.
    assert s.lookup(ns, keys)[0] == 1


def test_keys_from_hashes_are_key_from_hash_in_one_call():
    s = host_store()
    ns = s.register_namespace(namespace())
    hashes = [os.urandom(32) for _ in range(40)] + [b"", b"x", os.urandom(36)]
    want = [kvtier.key_from_hash(ns, h) for h in hashes]
    assert kvtier.keys_from_hashes(ns, hashes) == want
    assert kvtier.keys_from_hashes(ns, tuple(hashes)) == want
    assert kvtier.keys_from_hashes(ns, [bytearray(h) for h in hashes]) == want
    assert kvtier.keys_from_hashes(ns, [memoryview(h) for h in hashes]) == want
    assert kvtier.keys_from_hashes(ns, []) == []
    assert all(len(k) == 16 for k in want)
    assert kvtier.keys_from_hashes(s.register_namespace(namespace("other")), hashes[:1]) != want[:1]


class Hashy:
    def __repr__(self):
        return "REPR-MUST-NOT-BE-HASHED"


@pytest.mark.parametrize(
    "bad, type_name",
    [(12345, "int"), ("abc", "str"), (None, "NoneType"), ((1, 2), "tuple"), (Hashy(), "Hashy")],
)
def test_keys_from_hashes_refuses_anything_not_bytes_like(bad, type_name):
    ns = host_store().register_namespace(namespace())
    with pytest.raises(TypeError, match=rf"hashes\[1\]: .*got {type_name}") as e:
        kvtier.keys_from_hashes(ns, [b"ok", bad, b"ok"])
    assert "REPR-MUST-NOT-BE-HASHED" not in str(e.value)


def test_keys_from_hashes_refuses_a_bad_namespace_or_a_non_iterable():
    with pytest.raises(kvtier.InvalidArgumentError, match="16 bytes"):
        kvtier.keys_from_hashes(b"short", [b"h"])
    ns = host_store().register_namespace(namespace())
    with pytest.raises(TypeError, match="hashes: an iterable"):
        kvtier.keys_from_hashes(ns, 7)
    # A str iterates into strs: refused at its first character.
    with pytest.raises(TypeError, match=r"hashes\[0\]: .*got str"):
        kvtier.keys_from_hashes(ns, "abc")


def test_bad_input_raises_and_changes_nothing(store):
    ns = store.register_namespace(namespace())
    src, dst = kv_caches(6), kv_caches()
    keys = keys_for(ns, 2)
    layers = layers_of(src)
    bad = [
        # (exception, message, arguments after ns)
        (kvtier.InvalidArgumentError, "2 keys and 3 block ids", (keys, layers, LAYER_BLOCK, [0, 1, 2])),
        (kvtier.InvalidArgumentError, "block id 12 is outside layer 0", (keys, layers, LAYER_BLOCK, [0, 12])),
        (kvtier.InvalidArgumentError, "at least one layer", (keys, [], LAYER_BLOCK, [0, 1])),
        (kvtier.BlockSizeError, "blocks of 8192 bytes; the namespace's blocks are 16384", (keys, layers[:1], LAYER_BLOCK, [0, 1])),
        (kvtier.BlockSizeError, "blocks of 16382 bytes", (keys, layers, LAYER_BLOCK - 1, [0, 1])),
        (kvtier.InvalidArgumentError, "block stride", (keys, [(a, 64, n) for a, _, n in layers], LAYER_BLOCK, [0, 1])),
        (kvtier.InvalidArgumentError, "keys must not be empty", ([], layers, LAYER_BLOCK, [])),
        (kvtier.InvalidArgumentError, "key 1 is 15 bytes", ([keys[0], keys[1][:15]], layers, LAYER_BLOCK, [0, 1])),
    ]
    for method in (store.save_blocks, store.load_blocks):
        for exc, msg, args in bad:
            with pytest.raises(exc, match=msg):
                method(ns, *args)
        with pytest.raises(kvtier.InvalidArgumentError, match="device"):
            method(ns, keys, layers, LAYER_BLOCK, [0, 1], device="tpu")
        with pytest.raises(kvtier.UnknownNamespaceError):
            method(bytes(16), keys, layers, LAYER_BLOCK, [0, 1])
    stats = store.stats()
    assert stats["stored_blocks"] == 0
    assert stats["stores"] == 0
    assert store.lookup(ns, keys)[0] == 0
    assert not any(t.any() for t in dst)
    # A refused load writes nothing either, with the blocks present.
    save(store, ns, keys, src, [0, 1])
    with pytest.raises(kvtier.InvalidArgumentError):
        store.load_blocks(ns, keys, layers_of(dst), LAYER_BLOCK, [0, 99])
    assert not any(t.any() for t in dst)


def test_a_save_larger_than_the_pool_stores_every_block_with_a_disk_behind(tmp_path):
    """Reservations cover what the pool holds; the rest follow, pushing the
    first blocks to disk, as put does."""
    s = kvtier.Store(
        {
            "host": {"capacity_bytes": 4 * BLOCK},
            "disk": {"dir": str(tmp_path), "capacity_bytes": 16 << 20, "segment_bytes": 1 << 20},
        }
    )
    ns = s.register_namespace(namespace())
    src, dst = kv_caches(7), kv_caches()
    keys = keys_for(ns, 10)
    assert save(s, ns, keys, src, list(range(10)))["stored"] == 10
    hit, tiers = s.lookup(ns, keys)
    assert hit == 10
    assert tiers[0] == "disk" and tiers[-1] == "host"
    assert load(s, ns, keys, dst, list(range(10))) == (10, None)
    for b in range(10):
        assert block_of(dst, b) == block_of(src, b)
