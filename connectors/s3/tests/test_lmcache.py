"""LMCache 0.5.6's own ``s3://`` remote backend against kvtierd's blocks
bucket (lmcache_s3_run.py does the LMCache part).

That backend (lmcache/v1/storage_backend/connector/s3_connector.py) has no
endpoint or path-style option: the URL ``s3://HOST[:PORT]`` becomes the
Host header of every request, the path is ``/<key>``, so it speaks
virtual-host style only, ``s3://{bucket}.{domain}:{port}``, over http
with ``extra_config.disable_tls``. The name must resolve to 127.0.0.1:
lmcache_s3_run.py runs in a mount namespace (``unshare --mount``) whose
/etc/hosts says so; nothing on the machine changes."""

import json
import os
import pathlib
import subprocess
import sys

from s3kit import ACCESS_KEY, REGION, SECRET_KEY, VIRTUAL_DOMAIN, unique

HERE = pathlib.Path(__file__).resolve().parent


def test_lmcache_s3_backend_put_get(s3, tmp_path):
    host = f"{s3.kv}.{VIRTUAL_DOMAIN}"
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {host}\n")
    script = f'mount --bind "{hosts}" /etc/hosts && exec "$0" "$@"'
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        unshare[1:1] = ["--user", "--map-root-user"]
    cmd = unshare + [
        "sh",
        "-c",
        script,
        sys.executable,
        str(HERE / "lmcache_s3_run.py"),
        f"{host}:{s3.port}",
        REGION,
        ACCESS_KEY,
        SECRET_KEY,
        f"org/{unique('model')}",  # keys of this run only
    ]
    env = {**os.environ, "LMCACHE_TRACK_USAGE": "false"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["ok"]
    # The chunks are objects of the blocks bucket, named by LMCache's keys.
    c = s3.client()
    for key in result["keys"]:
        assert c.head_object(Bucket=s3.kv, Key=key)["ContentLength"] == 8192, key
