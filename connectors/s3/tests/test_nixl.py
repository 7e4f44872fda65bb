"""NVIDIA NIXL's OBJ (S3) plugin, from the nixl-cu12 1.5.1 wheel, on a CPU:
blocks written from DRAM to kvtierd and read back byte for byte.

What it sends (connectors/s3/NOTES.md): by default PUTs with
Content-Encoding: aws-chunked, Transfer-Encoding: chunked, no
Content-Length, Expect: 100-continue and a trailing
x-amz-checksum-crc64nvme, signed STREAMING-UNSIGNED-PAYLOAD-TRAILER; with
req_checksum=required a plain PUT with a signed payload hash. Reads are
ranged GETs with x-amz-checksum-mode: enabled; presence is a HEAD per key
(query_memory). With crtMinLimit set, objects of that size or more go
through the S3 CRT client: a multipart upload whose request lines are in
absolute form (`PUT http://host:port/bucket/key?... HTTP/1.1`)."""

import random

import numpy as np
import pytest
from s3kit import ACCESS_KEY, REGION, SECRET_KEY, unique

# nixl-cu12 installs the module nixl_cu12 (the `nixl` meta-package, not
# installable at 1.5.2, would alias it as nixl). Missing: run in the venv
# of scripts/s3-env.sh.
import nixl_cu12._api as nixl  # noqa: E402
from nixl_cu12._bindings import nixlBackendError  # noqa: E402

KiB = 1024
MiB = 1024 * 1024


class ObjAgent:
    """A NIXL agent with only the OBJ backend, pointed at the server."""

    _count = 0

    def __init__(self, s3, bucket, **params):
        ObjAgent._count += 1
        self.name = f"kvtier-s3-test-{ObjAgent._count}"
        self.agent = nixl.nixl_agent(self.name, nixl.nixl_agent_config(backends=[]))
        assert "OBJ" in self.agent.get_plugin_list()
        backend = {
            "endpoint_override": s3.endpoint,
            "scheme": "http",
            "access_key": ACCESS_KEY,
            "secret_key": SECRET_KEY,
            "bucket": bucket,
            "region": REGION,
            "use_virtual_addressing": "false",
        }
        backend.update(params)
        self.agent.create_backend("OBJ", backend)
        self.next_dev = 0
        self.keep = []  # buffers NIXL holds pointers to

    def dram(self, arrays):
        self.keep += arrays
        self.agent.register_memory([(a.ctypes.data, a.nbytes, 0, "") for a in arrays], "DRAM")

    def objects(self, keys_and_sizes):
        """Registers OBJ descriptors (the key is the descriptor's meta info;
        the plugin maps a device id to it) and returns their device ids."""
        ids = []
        descs = []
        for key, size in keys_and_sizes:
            self.next_dev += 1
            ids.append(self.next_dev)
            descs.append((0, size, self.next_dev, key))
        self.agent.register_memory(descs, "OBJ")
        return ids

    def transfer(self, op, local, remote):
        """local: [(array, offset, length)], remote: [(dev_id, offset, length)].
        Returns NIXL's final state; NIXL raises nixlBackendError from
        check_xfer_state when the backend failed."""
        ldescs = self.agent.get_xfer_descs([(a.ctypes.data + off, n, 0) for a, off, n in local], "DRAM")
        rdescs = self.agent.get_xfer_descs([(off, n, dev) for dev, off, n in remote], "OBJ")
        handle = self.agent.initialize_xfer(op, ldescs, rdescs, self.name)
        try:
            state = self.agent.transfer(handle)
            while state not in ("DONE", "ERR"):
                state = self.agent.check_xfer_state(handle)
            return state
        finally:
            try:
                self.agent.release_xfer_handle(handle)
            except Exception:
                pass


def blocks(sizes, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]


@pytest.mark.parametrize("req_checksum", [None, "required"], ids=["default-aws-chunked-crc64nvme", "req_checksum-required"])
def test_write_read_blocks(s3, req_checksum):
    params = {"req_checksum": req_checksum} if req_checksum else {}
    a = ObjAgent(s3, s3.kv, **params)
    sizes = [256 * KiB, 256 * KiB, MiB + 17, 3]
    src = blocks(sizes, seed=1)
    dst = [np.zeros_like(b) for b in src]
    a.dram(src + dst)
    prefix = unique("nixl")
    keys = [f"{prefix}/block-{i}" for i in range(len(src))]
    ids = a.objects(zip(keys, sizes))
    assert a.transfer("WRITE", [(b, 0, b.nbytes) for b in src], [(d, 0, b.nbytes) for d, b in zip(ids, src)]) == "DONE"
    # The server stored the decoded bytes (not the aws-chunked framing).
    c = s3.client()
    for key, b in zip(keys, src):
        assert c.get_object(Bucket=s3.kv, Key=key)["Body"].read() == b.tobytes()
    assert a.transfer("READ", [(b, 0, b.nbytes) for b in dst], [(d, 0, b.nbytes) for d, b in zip(ids, dst)]) == "DONE"
    for s_, d in zip(src, dst):
        assert np.array_equal(s_, d)


def test_ranged_read(s3):
    """A read at an offset into the object is a ranged GET; NIXL checks any
    x-amz-checksum-* the response carries against the bytes received, so a
    server must not return the whole object's checksum on a partial read."""
    a = ObjAgent(s3, s3.kv)
    (src,) = blocks([200 * KiB], seed=2)
    part = np.zeros(5000, dtype=np.uint8)
    a.dram([src, part])
    (dev,) = a.objects([(unique("nixl-range"), src.nbytes)])
    assert a.transfer("WRITE", [(src, 0, src.nbytes)], [(dev, 0, src.nbytes)]) == "DONE"
    for offset in (0, 1000, src.nbytes - part.nbytes):
        part[:] = 0
        assert a.transfer("READ", [(part, 0, part.nbytes)], [(dev, offset, part.nbytes)]) == "DONE"
        assert np.array_equal(part, src[offset : offset + part.nbytes]), offset


def test_query_memory(s3):
    """query_memory is a HEAD per key: a present key answers {}, a missing
    one None."""
    a = ObjAgent(s3, s3.kv)
    (src,) = blocks([4 * KiB], seed=3)
    a.dram([src])
    present, missing = unique("nixl-q"), unique("nixl-q")
    (dev,) = a.objects([(present, src.nbytes)])
    assert a.transfer("WRITE", [(src, 0, src.nbytes)], [(dev, 0, src.nbytes)]) == "DONE"
    got = a.agent.query_memory([(0, 0, 0, present), (0, 0, 0, missing)], "OBJ", "OBJ")
    assert got == [{}, None]


def test_read_missing_key_fails(s3):
    """NIXL reports a failed GET (404 NoSuchKey) as NIXL_ERR_BACKEND from
    check_xfer_state. (aws-sdk-cpp streams the XML error body into the
    destination buffer: its first bytes are then `<?xml ...`, not the old
    contents.)"""
    a = ObjAgent(s3, s3.kv)
    dst = np.full(1000, 7, dtype=np.uint8)
    a.dram([dst])
    (dev,) = a.objects([(unique("nixl-missing"), dst.nbytes)])
    try:
        state = a.transfer("READ", [(dst, 0, dst.nbytes)], [(dev, 0, dst.nbytes)])
    except nixlBackendError as e:
        assert "NIXL_ERR_BACKEND" in str(e)
    else:
        assert state == "ERR"


def test_crt_client_multipart(s3):
    """crtMinLimit routes objects of that size or more through aws-sdk-cpp's
    S3 CRT client: CreateMultipartUpload, UploadPart, Complete (with
    x-amz-mp-object-size), request lines in absolute form; read back with
    one ranged GET. In the objects bucket (ckpt)."""
    a = ObjAgent(s3, s3.ckpt, crtMinLimit=str(5 * MiB))
    size = 6 * MiB + 5
    (src,) = blocks([size], seed=4)
    dst = np.zeros_like(src)
    a.dram([src, dst])
    key = unique("nixl-crt")
    (dev,) = a.objects([(key, size)])
    assert a.transfer("WRITE", [(src, 0, size)], [(dev, 0, size)]) == "DONE"
    assert s3.client().head_object(Bucket=s3.ckpt, Key=key)["ContentLength"] == size
    assert a.transfer("READ", [(dst, 0, size)], [(dev, 0, size)]) == "DONE"
    assert np.array_equal(src, dst)


def test_many_blocks_one_transfer(s3):
    """A batch of small blocks in one transfer: the plugin issues the PUTs
    (and GETs) concurrently from its thread pool."""
    a = ObjAgent(s3, s3.kv)
    rnd = random.Random(5)
    sizes = [rnd.randrange(1, 64 * KiB) for _ in range(32)]
    src = blocks(sizes, seed=5)
    dst = [np.zeros_like(b) for b in src]
    a.dram(src + dst)
    prefix = unique("nixl-batch")
    ids = a.objects([(f"{prefix}/{i:03d}", n) for i, n in enumerate(sizes)])
    assert a.transfer("WRITE", [(b, 0, b.nbytes) for b in src], [(d, 0, b.nbytes) for d, b in zip(ids, src)]) == "DONE"
    assert a.transfer("READ", [(b, 0, b.nbytes) for b in dst], [(d, 0, b.nbytes) for d, b in zip(ids, dst)]) == "DONE"
    for s_, d in zip(src, dst):
        assert np.array_equal(s_, d)
    listed = s3.client().list_objects_v2(Bucket=s3.kv, Prefix=prefix + "/")["Contents"]
    assert [o["Size"] for o in listed] == sizes
