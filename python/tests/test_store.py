"""The embedded store through the binding."""

import threading

import numpy as np
import pytest

import kvtier
from conftest import namespace

BLOCK = 16 * 2 * 2 * 2 * 64 * 2  # tokens x layers x K,V x heads x dim x f16 = 16 KiB


def host_store(capacity=64 << 20):
    return kvtier.Store({"host": {"capacity_bytes": capacity}})


def keys_for(ns_id, n, tag=b""):
    return [kvtier.key_from_hash(ns_id, tag + i.to_bytes(8, "little")) for i in range(n)]


def test_round_trip_with_numpy_in_place():
    s = host_store()
    ns = s.register_namespace(namespace())
    assert len(ns) == 16
    assert s.block_bytes(ns) == BLOCK
    keys = keys_for(ns, 4)
    # KV as the engine holds it: float16, written and read in place.
    src = np.random.default_rng(7).standard_normal((4, BLOCK // 2)).astype(np.float16)
    assert s.put(ns, keys, src) == {"stored": 4, "present": 0, "not_admitted": 0}
    assert s.lookup(ns, keys + keys_for(ns, 1, b"x")) == (4, ["host"] * 4)
    out = np.zeros_like(src)
    assert s.get(ns, keys, out) == (4, None)
    assert np.array_equal(out.view(np.uint16), src.view(np.uint16))
    # bytes and bytearray work too.
    raw = bytearray(BLOCK)
    assert s.get(ns, keys[2:3], raw) == (1, None)
    assert bytes(raw) == src[2].tobytes()
    assert s.put(ns, keys[:1], src[0].tobytes())["present"] == 1
    stats = s.stats()
    assert stats["stored_blocks"] == 4
    assert stats["host"]["usage"]["blocks"] == 4


def test_a_miss_loads_the_present_prefix_only():
    s = host_store()
    ns = s.register_namespace(namespace())
    keys = keys_for(ns, 3)
    s.put(ns, keys[:2], np.ones(2 * BLOCK, np.uint8))
    out = np.zeros(3 * BLOCK, np.uint8)
    assert s.get(ns, keys, out) == (2, None)
    assert out[: 2 * BLOCK].all() and not out[2 * BLOCK :].any()


def test_bad_input_is_precise_and_changes_nothing():
    s = host_store()
    ns = s.register_namespace(namespace())
    keys = keys_for(ns, 2)
    with pytest.raises(kvtier.BlockSizeError, match="needs a buffer of 32768 bytes, got 32767"):
        s.put(ns, keys, bytes(2 * BLOCK - 1))
    with pytest.raises(kvtier.UnknownNamespaceError, match="not registered"):
        s.put(bytes(16), keys, bytes(2 * BLOCK))
    with pytest.raises(kvtier.InvalidArgumentError, match="key 0 is 3 bytes"):
        s.lookup(ns, [b"abc"])
    with pytest.raises(kvtier.InvalidArgumentError, match="head_dim"):
        s.register_namespace(namespace(head_dim=0))
    with pytest.raises(kvtier.InvalidArgumentError, match="namespace"):
        s.register_namespace({"model_id": "m"})
    with pytest.raises(BufferError):
        s.get(ns, keys, bytes(2 * BLOCK))  # read-only output
    with pytest.raises((BufferError, ValueError), match="contiguous"):
        s.put(ns, keys, np.zeros((2 * BLOCK, 2), np.uint8)[:, 0])
    assert s.stats()["stored_blocks"] == 0
    assert s.lookup(ns, keys) == (0, [])


def test_bad_config_names_the_key():
    with pytest.raises(kvtier.InvalidArgumentError, match="capacity_byte"):
        kvtier.Store({"host": {"capacity_byte": 1 << 20}})
    with pytest.raises(kvtier.InvalidArgumentError, match="ssd-only mode takes no"):
        kvtier.Store(toml='mode = "ssd-only"\n[host]\ncapacity_bytes = 1048576\n')
    with pytest.raises(ValueError):
        kvtier.Store()


def test_ssd_only_store_survives_a_restart(tmp_path):
    cfg = {"mode": "ssd-only", "disk": {"dir": str(tmp_path), "capacity_bytes": 64 << 20, "segment_bytes": 8 << 20}}
    s = kvtier.Store(cfg)
    ns = s.register_namespace(namespace())
    keys = keys_for(ns, 8)
    data = np.random.default_rng(1).integers(0, 255, 8 * BLOCK, dtype=np.uint8)
    s.put(ns, keys, data)
    del s
    s = kvtier.Store(cfg)
    s.register_namespace(namespace())
    assert s.lookup(ns, keys) == (8, ["disk"] * 8)
    out = np.zeros_like(data)
    assert s.get(ns, keys, out) == (8, None)
    assert np.array_equal(out, data)


def test_namespaces_never_share_blocks():
    s = host_store()
    a = s.register_namespace(namespace("model-a"))
    b = s.register_namespace(namespace("model-b"))
    s.put(a, [kvtier.key_from_hash(a, b"h")], bytes(BLOCK))
    assert s.lookup(b, [kvtier.key_from_hash(b, b"h")]) == (0, [])
    assert kvtier.key_from_hash(a, b"h") != kvtier.key_from_hash(b, b"h")


def test_token_keys_chain_their_prefix():
    n = namespace()
    t = list(range(64))
    ka = kvtier.keys_from_tokens(n, t)
    kb = kvtier.keys_from_tokens(n, t[:32] + [9] * 32)
    assert len(ka) == 4 and all(len(k) == 16 for k in ka)
    assert ka[:2] == kb[:2] and ka[2] != kb[2] and ka[3] != kb[3]
    assert kvtier.keys_from_tokens(n, t[:20]) == ka[:1]  # a partial block is not a block


def test_the_interpreter_is_released_during_io():
    s = host_store(600 << 20)
    ns = s.register_namespace(namespace(block_tokens=1024))
    keys = keys_for(ns, 32)
    data = np.ones(32 * s.block_bytes(ns), np.uint8)  # 32 MiB
    count = [0]
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            count[0] += 1

    t = threading.Thread(target=spin)
    t.start()
    try:
        before = count[0]
        for round_ in range(4):
            s.put(ns, keys_for(ns, 32, bytes([round_])), data)
        during = count[0] - before
    finally:
        stop.set()
        t.join()
    # Held, the interpreter would let the thread run only between calls.
    assert during > 1000, during
