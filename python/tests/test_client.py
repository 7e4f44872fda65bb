"""Daemon mode: the binding's client against a real kvtierd."""

import numpy as np
import pytest

import kvtier
from conftest import namespace

BLOCK = 16 * 2 * 2 * 2 * 64 * 2


def test_client_round_trip(kvtierd):
    c = kvtier.Client(kvtierd.endpoint)
    assert c.health()["mode"] == "ssd-only"
    ns = c.register_namespace(namespace())
    keys = [kvtier.key_from_hash(ns, bytes([i])) for i in range(3)]
    src = np.random.default_rng(3).integers(0, 255, 3 * BLOCK, dtype=np.uint8)
    assert c.put(ns, keys, src)["stored"] == 3
    assert c.lookup(ns, keys) == (3, ["disk"] * 3)
    out = np.zeros_like(src)
    assert c.get(ns, keys, out) == (3, None)
    assert np.array_equal(out, src)
    assert c.delete(ns, keys[2:]) == 1
    assert c.get(ns, keys, out) == (2, None)
    assert c.stats()["stored_blocks"] == 3


def test_client_errors_are_precise(kvtierd):
    c = kvtier.Client(kvtierd.endpoint)
    ns = c.register_namespace(namespace())
    with pytest.raises(kvtier.BlockSizeError, match="put ended after"):
        c.put(ns, [kvtier.key_from_hash(ns, b"a")], bytes(BLOCK - 1))
    with pytest.raises(kvtier.UnknownNamespaceError):
        c.lookup(bytes(16), [bytes(16)])


def test_daemon_down_is_unavailable():
    with pytest.raises(kvtier.UnavailableError):
        kvtier.Client("http://127.0.0.1:1")
