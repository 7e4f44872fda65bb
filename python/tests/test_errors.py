"""One error model: the same mistake raises the same exception class in an
embedded Store and through a real kvtierd, and a throttled daemon raises
ThrottledError while its connection stays usable."""

import os
import tempfile

import numpy as np
import pytest

import kvtier
from kvtier_testkit import Daemon, namespace, throttled_daemon, throttling_manager_toml

BLOCK_TOKENS = 16
# conftest.namespace's layout: tokens x layers x K/V x kv heads x head dim x f16.
BLOCK = BLOCK_TOKENS * 2 * 2 * 2 * 64 * 2


@pytest.fixture
def both():
    """An embedded Store and a Client of a kvtierd with the same manager."""
    with tempfile.TemporaryDirectory() as d:
        store = kvtier.Store(toml=throttling_manager_toml(os.path.join(d, "embedded"), 4))
        daemon = throttled_daemon(d, 4, env={"KVTIER_MAX_REQUEST_BYTES": str(8 << 20)})
        try:
            yield store, kvtier.Client(daemon.endpoint)
        finally:
            daemon.stop()


def _raised(f):
    with pytest.raises(kvtier.KvTierError) as e:
        f()
    return type(e.value)


def test_the_same_mistake_raises_the_same_class(both):
    store, client = both
    ns_dict = namespace("errors")
    ids = [s.register_namespace(ns_dict) for s in (store, client)]
    block = BLOCK
    assert store.block_bytes(ids[0]) == BLOCK
    keys = kvtier.keys_from_tokens(ns_dict, list(range(2 * BLOCK_TOKENS)))
    unknown = bytes(16)
    mistakes = {
        "a buffer that is not whole blocks": lambda s, ns: s.put(ns, keys, np.zeros(block + 1, np.uint8)),
        "an unknown namespace": lambda s, ns: s.put(unknown, keys, np.zeros(2 * block, np.uint8)),
        "an unknown namespace, looked up": lambda s, ns: s.lookup(unknown, keys),
        "no keys": lambda s, ns: s.lookup(ns, []),
    }
    for what, f in mistakes.items():
        classes = [_raised(lambda s=s, ns=ns: f(s, ns)) for s, ns in zip((store, client), ids)]
        assert classes[0] is classes[1], f"{what}: embedded {classes[0].__name__}, daemon {classes[1].__name__}"
        assert classes[0] is not kvtier.KvTierError, f"{what}: raised the base class only"
    # The classes expected for each mistake.
    assert _raised(lambda: client.put(ids[1], keys, np.zeros(block + 1, np.uint8))) is kvtier.BlockSizeError
    assert _raised(lambda: client.lookup(unknown, keys)) is kvtier.UnknownNamespaceError


def test_throttled_is_not_an_outage(both):
    store, client = both
    ns_dict = namespace("throttle")
    for s in (store, client):
        ns = s.register_namespace(ns_dict)
        block = BLOCK
        # Six new blocks cannot fit a queue of four: refused whole.
        keys = kvtier.keys_from_tokens(ns_dict, list(range(6 * BLOCK_TOKENS)))
        with pytest.raises(kvtier.ThrottledError):
            s.put(ns, keys, np.ones(6 * block, np.uint8))
        assert s.lookup(ns, keys)[0] == 0, "a throttled put stores nothing"
        # The same connection serves the next, smaller request.
        r = s.put(ns, keys[:2], np.ones(2 * block, np.uint8))
        assert r["stored"] == 2, r


def test_oversize_is_too_large_and_an_invalid_argument(both):
    _, client = both
    ns_dict = namespace("big", block_tokens=1024)
    ns = client.register_namespace(ns_dict)
    block = 1024 * 2 * 2 * 2 * 64 * 2  # tokens x layers x K/V x heads x dim x f16
    n = (8 << 20) // block + 1
    keys = kvtier.keys_from_tokens(ns_dict, list(range(n * 1024)))
    with pytest.raises(kvtier.TooLargeError) as e:
        client.put(ns, keys, np.zeros(n * block, np.uint8))
    assert isinstance(e.value, kvtier.InvalidArgumentError)
    assert "max_request_bytes" in str(e.value)


def test_a_refused_token_is_permission_denied():
    with tempfile.TemporaryDirectory() as d:
        daemon = Daemon(d, env={"KVTIER_AUTH_TOKEN": "s3cret"})
        try:
            with pytest.raises(kvtier.PermissionDeniedError):
                kvtier.Client(daemon.endpoint).register_namespace(namespace("auth"))
            ns = kvtier.Client(daemon.endpoint, token="s3cret").register_namespace(namespace("auth"))
            assert len(ns) == 16
        finally:
            daemon.stop()
