"""Tier-tagged KV events (kvtier.vllm_events) from the connector on vLLM's
real scheduler: what vLLM's KV event publisher hands to a KV-aware router
such as NVIDIA Dynamo's."""

import time

import pytest

import kvtier
import vllm_harness as H
from kvtier_testkit import Daemon

from vllm.config import KVEventsConfig
from vllm.distributed.kv_events import BlockRemoved, BlockStored
from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

CONNECTOR = ("KvTierConnector", "kvtier.vllm")
BLOCK = 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return H.make_model_dir(tmp_path_factory.mktemp("tiny-llama"))


def engine(model_dir, extra, events=True):
    ev = KVEventsConfig(enable_kv_cache_events=True, publisher="null") if events else None
    vc = H.make_vllm_config(model_dir, *CONNECTOR, extra, kv_events_config=ev)
    kcc = H.make_kv_cache_config(vc)
    sched = H.make_scheduler(vc, kcc)
    # vLLM's scheduler takes the connector's events every step (and hands
    # them to its publisher): keep a copy of what it took.
    take, sched.taken = sched.connector.take_events, []

    def tee():
        out = list(take())
        sched.taken.extend(out)
        return out

    sched.connector.take_events = tee
    return sched, H.make_worker(vc, kcc)


def serve(sched, worker, req_id, tokens):
    req = H.make_request(req_id, tokens, max_tokens=1)
    sched.add_request(req)
    H.run_until_finished(sched, worker, [req_id], max_steps=20)
    return req


def drain(sched, worker, deadline_s=20.0):
    """The connector's tier events once its saves are stored and the feed
    read (tried until a read succeeds: a restarted daemon takes a moment)."""
    worker.connector.flush_saves()
    ev = sched.connector._events
    end = time.monotonic() + deadline_s
    while not ev.flush():
        assert time.monotonic() < end, "the tier-event feed never answered"
        time.sleep(0.2)
    sched.connector.take_events()
    out, sched.taken = sched.taken, []
    return out


def by_medium(events, kind):
    out = {}
    for e in events:
        if isinstance(e, kind):
            out.setdefault(e.medium, []).extend(e.block_hashes)
    return out


def prompt(seed, blocks):
    return [seed * 1000 + t for t in range(blocks * BLOCK)] + [1]


def test_saved_blocks_are_announced_per_tier_with_vllms_hashes_parents_and_tokens(model_dir, tmp_path):
    # A host tier of 4 blocks in front of the SSD: demotions move blocks
    # from CPU_PINNED to DISK, and the router hears both.
    block_bytes = 2 * 2 * 2 * 64 * BLOCK * 2  # layers, K/V, kv heads, head dim, tokens, f16
    extra = {"host_capacity_bytes": 4 * block_bytes, "disk_dir": str(tmp_path / "ssd"), "tier_events": True}
    sched, worker = engine(model_dir, extra)
    req = serve(sched, worker, "a", prompt(1, 3))
    events = drain(sched, worker)
    stored = [e for e in events if isinstance(e, BlockStored)]
    # One chained run, as vLLM announces a prompt's blocks.
    assert len(stored) == 1, events
    (e,) = stored
    want = [maybe_convert_block_hash(h) for h in req.block_hashes[:3]]
    assert e.medium == "CPU_PINNED"
    assert e.block_hashes == want
    assert e.parent_block_hash is None
    assert e.token_ids == prompt(1, 3)[: 3 * BLOCK]
    assert e.block_size == BLOCK
    assert not any(isinstance(e, BlockRemoved) for e in events)
    # A run that continues a stored one names its parent.
    serve(sched, worker, "a2", prompt(1, 3)[: 3 * BLOCK] + prompt(9, 1))
    (e,) = [e for e in drain(sched, worker) if isinstance(e, BlockStored)]
    assert e.parent_block_hash == want[-1]
    assert len(e.block_hashes) == 1

    # Three more blocks: the host tier holds four (all taken), so three
    # are demoted.
    serve(sched, worker, "b", prompt(2, 3))
    events = drain(sched, worker)
    removed = by_medium(events, BlockRemoved)
    disk = by_medium(events, BlockStored).get("DISK", [])
    assert len(removed.get("CPU_PINNED", [])) == 3, events
    assert sorted(map(repr, disk)) == sorted(map(repr, removed["CPU_PINNED"])), "demoted, not lost"
    assert set(removed) == {"CPU_PINNED"}, "nothing left the SSD"


def test_a_daemon_restart_is_resynced_and_a_lost_block_is_never_kept(model_dir, tmp_path):
    d = Daemon(tmp_path / "data")
    extra = {"mode": "daemon", "endpoint": d.endpoint, "tier_events": True}
    try:
        sched, worker = engine(model_dir, extra)
        req = serve(sched, worker, "a", prompt(3, 3))
        events = drain(sched, worker)
        hashes = [maybe_convert_block_hash(h) for h in req.block_hashes[:3]]
        assert by_medium(events, BlockStored) == {"DISK": hashes}, events
        # kvtierd restarts on the same SSD: nothing changed, nothing to say.
        d.stop()
        d = Daemon(tmp_path / "data")
        resyncs = sched.connector._events.resyncs
        _redirect(sched, d)
        events = drain(sched, worker)
        assert sched.connector._events.resyncs > resyncs, "another epoch resyncs"
        assert events == [], events
        # kvtierd comes back on an empty SSD: every block is reported gone.
        d.stop()
        d = Daemon(tmp_path / "other-data")
        _redirect(sched, d)
        events = drain(sched, worker)
        assert by_medium(events, BlockRemoved) == {"DISK": hashes}, events
        assert not any(isinstance(e, BlockStored) for e in events)
    finally:
        d.stop()


def _redirect(sched, daemon):
    """Points the scheduler's daemon client at a restarted kvtierd (a new
    port: the test kit binds port 0)."""
    store = sched.connector._store
    with store._lock:
        store._endpoint = daemon.endpoint
        store._client = None
        store._next_try = 0.0


def test_a_feed_that_fails_never_stops_serving(model_dir, tmp_path):
    d = Daemon(tmp_path / "data")
    extra = {"mode": "daemon", "endpoint": d.endpoint, "tier_events": True, "timeout_s": 0.5}
    try:
        sched, worker = engine(model_dir, extra)
        serve(sched, worker, "a", prompt(4, 2))
        drain(sched, worker)
        d.stop()
        # The daemon is gone: the feed fails, the engine goes on.
        for i in range(3):
            serve(sched, worker, f"b{i}", prompt(5 + i, 2))
        sched.connector._events.flush()
        assert sched.connector._events.failures > 0
    finally:
        d.stop()


def test_events_are_off_unless_vllm_publishes_them(model_dir, tmp_path):
    sched, worker = engine(model_dir, {"disk_dir": str(tmp_path / "ssd")}, events=False)
    serve(sched, worker, "a", prompt(6, 2))
    assert sched.connector._events is None
    assert sched.taken == []


def test_bad_event_settings_are_refused(model_dir):
    for bad in ({"tier_events": "yes"}, {"tier_events_max_blocks": 0}, {"tier_events_max_blocks": True}):
        with pytest.raises(ValueError, match="tier_events"):
            engine(model_dir, bad)


def test_the_table_of_blocks_is_bounded_and_what_leaves_it_is_unannounced(model_dir, tmp_path):
    extra = {"disk_dir": str(tmp_path / "ssd"), "host_capacity_bytes": 0, "tier_events": True,
             "tier_events_max_blocks": 4}
    sched, worker = engine(model_dir, extra)
    a = serve(sched, worker, "a", prompt(7, 3))
    drain(sched, worker)
    serve(sched, worker, "b", prompt(8, 3))
    events = drain(sched, worker)
    gone = by_medium(events, BlockRemoved)
    first = [maybe_convert_block_hash(h) for h in a.block_hashes[:2]]
    assert gone == {"DISK": first}, events
    assert len(sched.connector._events._blocks) == 4
