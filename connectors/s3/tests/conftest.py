"""Fixtures: kvtier's Python test kit (python/tests/kvtier_testkit.py) and
one kvtierd with its S3 listener for the whole session (``s3``).

kvtierd is started with KVTIERD_S3_CONFIG below. If it prints no
``kvtierd s3 listening on`` line (a kvtierd without S3, or one that
refused the config), every test errors: nothing is skipped.

Developing against another server: KVTIER_S3_TEST_ENDPOINT=http://127.0.0.1:PORT
uses an already running S3 server instead of starting kvtierd. It must
hold the buckets of the config below and accept its credentials
(KVTIER_S3_TEST_BUCKET_KV names its blocks bucket if not "kv-blocks").
KVTIER_S3_TEST_SERVER=moto says that server is moto: the tests marked
``moto_differs`` (what moto does not implement, or does differently from
S3 and kvtierd) are then expected to fail (xfail, reported as such), and
only then. See connectors/s3/NOTES.md.
"""

import os
import pathlib
import sys
import tempfile

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "python" / "tests"))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from kvtier_testkit import Daemon  # noqa: E402
from s3kit import ACCESS_KEY, SECRET_KEY, VIRTUAL_DOMAIN, S3Server  # noqa: E402

# The blocks bucket. The contract's example calls it "kv", but bucket names
# have 3 to 63 characters (S3's rule; kvtierd enforces it too).
BLOCKS_BUCKET = "kv-blocks"

# The S3 side of kvtierd's config for these tests (the server contract).
KVTIERD_S3_CONFIG = f"""
[s3]
listen = "127.0.0.1:0"
domains = ["{VIRTUAL_DOMAIN}"]
max_clock_skew_s = 900
create_buckets = "objects"
# kvtierd holds a block in one tier record: the test daemon's 256 MiB disk
# takes blocks up to about 32 MiB, under the 64 MiB default.
max_block_object_bytes = {8 << 20}

[[s3.credentials]]
access_key_id = "{ACCESS_KEY}"
secret_access_key = "{SECRET_KEY}"

[[s3.buckets]]
name = "{BLOCKS_BUCKET}"
kind = "blocks"

[[s3.buckets]]
name = "ckpt"
kind = "objects"

[[s3.buckets]]
name = "public"
kind = "objects"
anonymous = true
"""

MOTO = os.environ.get("KVTIER_S3_TEST_SERVER", "") == "moto"


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "moto_differs(reason): moto (used only to develop these tests) does not behave like S3/kvtierd here; "
        "xfail only when KVTIER_S3_TEST_SERVER=moto",
    )


def pytest_collection_modifyitems(config, items):
    if not MOTO:
        return
    for item in items:
        m = item.get_closest_marker("moto_differs")
        if m is not None:
            reason = m.args[0] if m.args else m.kwargs.get("reason", "")
            item.add_marker(pytest.mark.xfail(reason=f"moto differs: {reason}", strict=False))


def start_kvtierd(dir_, s3_config=KVTIERD_S3_CONFIG):
    """A kvtierd under `dir_` with `s3_config`; fails (never skips) when it
    has no S3 listener."""
    dir_ = pathlib.Path(dir_)
    cfg = dir_ / "kvtierd.toml"
    cfg.write_text(s3_config)
    daemon = Daemon(dir_ / "data", config=cfg)
    if daemon.s3_endpoint is None:
        daemon.stop()
        pytest.fail(
            "kvtierd printed no 'kvtierd s3 listening on ADDR' line before 'kvtierd listening on': "
            "this kvtierd has no S3 listener (or ignored the [s3] table)"
        )
    return daemon


@pytest.fixture(scope="session")
def s3():
    external = os.environ.get("KVTIER_S3_TEST_ENDPOINT")
    if external:
        yield S3Server(
            endpoint=external.rstrip("/"),
            kv=os.environ.get("KVTIER_S3_TEST_BUCKET_KV", BLOCKS_BUCKET),
            is_moto=MOTO,
        )
        return
    with tempfile.TemporaryDirectory() as d:
        daemon = start_kvtierd(d)
        try:
            yield S3Server(endpoint=daemon.s3_endpoint, kv=BLOCKS_BUCKET, extra={"daemon": daemon})
        finally:
            daemon.stop()


@pytest.fixture
def own_kvtierd(tmp_path):
    """Starts a kvtierd of the test's own with the S3 config given:
    ``own_kvtierd(toml) -> S3Server``. Needs a kvtierd binary even when
    KVTIER_S3_TEST_ENDPOINT points elsewhere."""
    daemons = []

    def start(s3_config):
        d = tmp_path / f"kvtierd-{len(daemons)}"
        d.mkdir()
        daemon = start_kvtierd(d, s3_config)
        daemons.append(daemon)
        return S3Server(endpoint=daemon.s3_endpoint, kv=BLOCKS_BUCKET, extra={"daemon": daemon})

    yield start
    for daemon in daemons:
        daemon.stop()
