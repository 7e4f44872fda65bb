"""Checkpoints through the binding's client, against a real kvtierd."""

import pathlib
import tempfile

import numpy as np
import pytest

import kvtier
from conftest import Daemon

MIB = 1 << 20


@pytest.fixture
def kvtierd_1g():
    """kvtierd with a 1 GiB disk tier: its 128 MiB segments hold the default
    32 MiB chunks (conftest's 256 MiB disk has 32 MiB segments, whose largest
    block is a little under 32 MiB)."""
    with tempfile.TemporaryDirectory() as d:
        daemon = Daemon(d, env={"KVTIER_DISK_CAPACITY_BYTES": str(1 << 30)})
        try:
            yield daemon
        finally:
            daemon.stop()


def state(seed=7):
    """A small training state: a few MiB across buffers of several kinds."""
    rng = np.random.default_rng(seed)
    return {
        "model/shard-0.bin": rng.integers(0, 255, 3 * MIB + 17, dtype=np.uint8).tobytes(),
        "model/shard-1.bin": bytearray(rng.integers(0, 255, MIB, dtype=np.uint8).tobytes()),
        "optim/adam.npy": rng.standard_normal((512, 300), dtype=np.float32),
        "step.txt": memoryview(b"1000\n"),
        "empty": b"",
    }


def as_bytes(buf):
    return buf.tobytes() if isinstance(buf, np.ndarray) else bytes(buf)


def read_tree(root):
    root = pathlib.Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_put_from_memory_get_list_delete(kvtierd_1g, tmp_path):
    c = kvtier.Client(kvtierd_1g.endpoint)
    files = state()
    want = {path: as_bytes(b) for path, b in files.items()}
    put = c.checkpoint_put("step-1000", files, chunk_mib=1)
    assert put == {
        "name": "step-1000",
        "files": 5,
        "bytes": sum(len(b) for b in want.values()),
        # 4 + 1 + 1 (the 614400-byte array) + 1 + 0 (an empty file has no chunks)
        "chunks": 7,
    }

    (entry,) = c.checkpoint_list(chunk_mib=1)
    assert entry["created_unix_ms"] > 0
    assert {k: v for k, v in entry.items() if k != "created_unix_ms"} == put

    got = c.checkpoint_get("step-1000", tmp_path / "restore", chunk_mib=1)
    assert got == put
    assert read_tree(tmp_path / "restore") == want

    assert c.checkpoint_delete("step-1000", chunk_mib=1) is True
    assert c.checkpoint_list(chunk_mib=1) == []
    assert c.checkpoint_delete("step-1000", chunk_mib=1) is False
    with pytest.raises(kvtier.NotFoundError, match="step-1000"):
        c.checkpoint_get("step-1000", tmp_path / "again", chunk_mib=1)
    assert not (tmp_path / "again").exists() or read_tree(tmp_path / "again") == {}


def test_put_from_a_directory(kvtierd_1g, tmp_path):
    c = kvtier.Client(kvtierd_1g.endpoint)
    src = tmp_path / "ckpt"
    for path, b in state(seed=9).items():
        p = src / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(as_bytes(b))
    want = read_tree(src)

    put = c.checkpoint_put("from-dir", src, group="job-a")  # an os.PathLike
    assert put["files"] == len(want)
    assert put["bytes"] == sum(len(b) for b in want.values())
    assert [e["name"] for e in c.checkpoint_list(group="job-a")] == ["from-dir"]
    # Groups are apart, and the chunk size is part of the group.
    assert c.checkpoint_list() == []
    assert c.checkpoint_list(group="job-a", chunk_mib=16) == []

    c.checkpoint_get("from-dir", str(tmp_path / "restore"), group="job-a")
    assert read_tree(tmp_path / "restore") == want


def test_names_are_immutable(kvtierd_1g, tmp_path):
    c = kvtier.Client(kvtierd_1g.endpoint)
    first = {"a.bin": b"first" * 1000}
    c.checkpoint_put("step-1", first)
    before = c.checkpoint_list()
    with pytest.raises(kvtier.AlreadyExistsError, match="step-1"):
        c.checkpoint_put("step-1", {"a.bin": b"second", "b.bin": b"more"})
    assert c.checkpoint_list() == before
    c.checkpoint_get("step-1", tmp_path / "r")
    assert read_tree(tmp_path / "r") == {"a.bin": first["a.bin"]}
    assert issubclass(kvtier.AlreadyExistsError, kvtier.KvTierError)
    assert issubclass(kvtier.NotFoundError, kvtier.KvTierError)


@pytest.mark.parametrize(
    "files, kwargs, match",
    [
        ({"a.bin": b"x"}, {"chunk_mib": 0}, "chunk_mib 0"),
        ({"a.bin": b"x"}, {"chunk_mib": 300}, "chunk_mib 300"),
        ({"a.bin": b"x"}, {"chunk_mib": -1}, "chunk_mib -1"),
        ({"ok.bin": b"x", "../x": b"escape"}, {}, "checkpoint file path"),
        ({"/abs": b"x"}, {}, "checkpoint file path"),
        ({"a/./b": b"x"}, {}, "checkpoint file path"),
        ({1: b"x"}, {}, "not a str"),
        ({"a.bin": b"x"}, {"group": "no/slash"}, "checkpoint group"),
        ("/no/such/dir", {}, "not a directory"),
    ],
)
def test_bad_input_changes_nothing(kvtierd_1g, files, kwargs, match):
    c = kvtier.Client(kvtierd_1g.endpoint)
    c.checkpoint_put("kept", {"k.bin": b"keep"})
    before = c.checkpoint_list()
    with pytest.raises(kvtier.InvalidArgumentError, match=match):
        c.checkpoint_put("new", files, **kwargs)
    assert c.checkpoint_list() == before
    assert c.checkpoint_delete("new") is False


def test_bad_names_and_chunk_sizes_elsewhere(kvtierd_1g, tmp_path):
    c = kvtier.Client(kvtierd_1g.endpoint)
    with pytest.raises(kvtier.InvalidArgumentError, match="checkpoint name"):
        c.checkpoint_put("bad name", {"a": b"x"})
    for call in (
        lambda: c.checkpoint_list(chunk_mib=0),
        lambda: c.checkpoint_get("x", tmp_path / "r", chunk_mib=257),
        lambda: c.checkpoint_delete("x", chunk_mib=0),
    ):
        with pytest.raises(kvtier.InvalidArgumentError, match="chunk_mib"):
            call()
    assert not (tmp_path / "r").exists()
    assert c.checkpoint_list() == []


def test_a_non_contiguous_buffer_is_refused(kvtierd_1g):
    c = kvtier.Client(kvtierd_1g.endpoint)
    with pytest.raises(ValueError, match="contiguous"):
        c.checkpoint_put("strided", {"a": np.zeros((64, 64), dtype=np.uint8)[:, ::2]})
    assert c.checkpoint_list() == []

