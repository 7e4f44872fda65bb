"""A PyTorch distributed checkpoint (DCP) saved to kvtierd's ``ckpt``
bucket through s3torchconnector 1.5.0's S3StorageWriter and loaded back
through S3StorageReader.

The DCP classes take no endpoint: their mountpoint-s3-client reads
AWS_ENDPOINT_URL (and the credentials from AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY). What they send (connectors/s3/NOTES.md): every
file, even a 1 KiB one, as a multipart upload with 8 MiB parts
(S3ClientConfig.part_size), UNSIGNED-PAYLOAD, no checksums, part ETags
unquoted in CompleteMultipartUpload; `.metadata` written as
`.metadata.tmp`, then HEAD (Host without the port), CopyObject and
DeleteObject; reads are ranged GETs, the later ones with If-Match: <etag>."""

import pytest
import torch
import torch.distributed.checkpoint as dcp
from s3kit import ACCESS_KEY, REGION, SECRET_KEY, unique
from s3torchconnector import S3ClientConfig, S3ReaderConstructor
from s3torchconnector.dcp import S3StorageReader, S3StorageWriter

PART_BYTES = 8 * 1024 * 1024  # S3ClientConfig's default part_size

# One process, no process group: DCP says so on every call.
pytestmark = pytest.mark.filterwarnings(
    "ignore:torch.distributed is disabled:UserWarning",
    "ignore:Detected an existing checkpoint:UserWarning",
)


@pytest.fixture
def s3torch_env(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    # Path style: the bucket does not go into the host name. Few retries,
    # so a server error fails the test quickly instead of after backoff.
    return S3ClientConfig(force_path_style=True, max_attempts=2)


def state_dict():
    g = torch.Generator().manual_seed(0)
    return {
        "embed": torch.randn(3 * 1024 * 1024, generator=g),  # 12 MiB: more than one 8 MiB part
        "proj": torch.randn(1000, 1000, generator=g).to(torch.float16),
        "bias": torch.arange(10, dtype=torch.float32),
        "step": torch.tensor([1234], dtype=torch.int64),
        "mask": torch.rand(4096, generator=g) > 0.5,
    }


@pytest.mark.parametrize(
    "reader",
    [None, S3ReaderConstructor.sequential, S3ReaderConstructor.range_based],
    ids=["dcp_optimized", "sequential", "range_based"],
)
def test_save_and_load(s3, s3torch_env, reader):
    path = f"s3://{s3.ckpt}/{unique('dcp')}/step-1"
    sd = state_dict()
    dcp.save(sd, storage_writer=S3StorageWriter(region=REGION, path=path, s3client_config=s3torch_env))
    prefix = path.split("/", 3)[3]
    listed = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket=s3.ckpt, Prefix=prefix + "/")["Contents"])
    assert listed == [f"{prefix}/.metadata", f"{prefix}/__0_0.distcp"]  # .metadata.tmp renamed away
    shard = s3.client().head_object(Bucket=s3.ckpt, Key=f"{prefix}/__0_0.distcp")
    assert shard["ContentLength"] > PART_BYTES  # it went up in more than one part
    out = {k: torch.zeros_like(v) for k, v in sd.items()}
    kwargs = {"reader_constructor": reader()} if reader else {}
    dcp.load(out, storage_reader=S3StorageReader(region=REGION, path=path, s3client_config=s3torch_env, **kwargs))
    for k in sd:
        assert out[k].dtype == sd[k].dtype, k
        assert torch.equal(out[k], sd[k]), k


def test_overwrite_checkpoint(s3, s3torch_env):
    """Saving to the same path again replaces the files."""
    path = f"s3://{s3.ckpt}/{unique('dcp')}/latest"
    first = {"w": torch.zeros(1000), "n": torch.tensor([1])}
    second = {"w": torch.ones(1000), "n": torch.tensor([2])}
    dcp.save(first, storage_writer=S3StorageWriter(region=REGION, path=path, s3client_config=s3torch_env))
    dcp.save(second, storage_writer=S3StorageWriter(region=REGION, path=path, s3client_config=s3torch_env))
    out = {"w": torch.empty(1000), "n": torch.tensor([0])}
    dcp.load(out, storage_reader=S3StorageReader(region=REGION, path=path, s3client_config=s3torch_env))
    assert torch.equal(out["w"], second["w"]) and out["n"].item() == 2
