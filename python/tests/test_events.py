"""Tier events, locate and list_keys through the binding: the embedded
store and a real kvtierd answer the same way."""

import pytest

import kvtier
from conftest import namespace

BLOCK = 16 * 2 * 2 * 2 * 64 * 2


def keys_for(ns_id, n, tag=b""):
    return [kvtier.key_from_hash(ns_id, tag + i.to_bytes(8, "little")) for i in range(n)]


@pytest.fixture(params=["embedded", "daemon"])
def store(request, tmp_path):
    if request.param == "embedded":
        yield kvtier.Store({"host": {"capacity_bytes": 2 * BLOCK}, "disk": {"dir": str(tmp_path / "ssd"),
                                                                           "capacity_bytes": 64 << 20,
                                                                           "segment_bytes": 1 << 20}})
    else:
        kvtierd = request.getfixturevalue("kvtierd")
        yield kvtier.Client(kvtierd.endpoint)


def test_events_follow_stores_and_deletes_and_locate_agrees(store):
    ns = store.register_namespace(namespace())
    first = store.events(ns)
    assert first["resync"] is True
    keys = keys_for(ns, 3)
    store.put(ns, keys, bytes(3 * BLOCK))
    store.delete(ns, keys[1:2])
    page = store.events(ns, first["epoch"], first["cursor"])
    assert page["resync"] is False
    changes = [(change, key) for _, change, _, key in page["events"]]
    stored = [k for c, k in changes if c == "stored"]
    removed = [k for c, k in changes if c == "removed"]
    assert set(keys) <= set(stored)
    assert keys[1] in removed
    seqs = [seq for seq, *_ in page["events"]]
    assert seqs == list(range(first["cursor"] + 1, page["cursor"] + 1))
    located = store.locate(ns, keys)
    assert located[1] == []
    assert located[0] and located[2]
    assert all(t in ("host", "disk", "blob") for ts in located for t in ts)


def test_bad_event_reads_are_precise(store):
    ns = store.register_namespace(namespace())
    p = store.events(ns)
    with pytest.raises(kvtier.InvalidArgumentError, match="1 to 65536"):
        store.events(ns, p["epoch"], p["cursor"], 0)
    with pytest.raises(kvtier.InvalidArgumentError, match="past the last event"):
        store.events(ns, p["epoch"], p["cursor"] + 5)
    with pytest.raises(kvtier.InvalidArgumentError):
        store.locate(ns, [b"short"])
    with pytest.raises(kvtier.UnknownNamespaceError):
        store.events(bytes(16))


def test_list_keys_pages_in_key_order(store):
    ns = store.register_namespace(namespace())
    assert store.list_keys(ns) == ([], False)
    keys = keys_for(ns, 5, tag=b"list")
    store.put(ns, keys, bytes(5 * BLOCK))
    store.delete(ns, keys[2:3])
    want = sorted((k for i, k in enumerate(keys) if i != 2), key=lambda k: int.from_bytes(k, "little"))
    first, more = store.list_keys(ns, max=3)
    assert (first, more) == (want[:3], True)
    assert store.list_keys(ns, after=first[-1], max=3) == (want[3:], False)
    with pytest.raises(kvtier.InvalidArgumentError, match="1 to 65536 keys"):
        store.list_keys(ns, max=0)
    with pytest.raises(kvtier.InvalidArgumentError, match="1 to 65536 keys"):
        store.list_keys(ns, max=-1)
    with pytest.raises(kvtier.InvalidArgumentError, match="after is 3 bytes"):
        store.list_keys(ns, after=b"abc")
    with pytest.raises(kvtier.UnknownNamespaceError):
        store.list_keys(bytes(16))
