"""kvtier's Python test kit: namespaces, and a real kvtierd process on
127.0.0.1 (``Daemon``, the ``kvtierd`` fixture). Shared by ``python/tests``
and the connectors' tests (``connectors/<engine>/tests``), whose conftest.py
files import it."""

import os
import pathlib
import signal
import subprocess
import tempfile
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def namespace(model="test-model", block_tokens=16, layers=2, kv_heads=2, head_dim=64, dtype="f16", **extra):
    ns = {
        "model_id": model,
        "layout": {
            "num_layers": layers,
            "kv_heads": kv_heads,
            "head_dim": head_dim,
            "block_tokens": block_tokens,
            "kind": "kv",
            "dtype": dtype,
        },
    }
    ns.update(extra)
    return ns


def kvtierd_binary():
    for profile in ("release", "debug"):
        p = ROOT / "target" / profile / "kvtierd"
        if p.exists():
            return p
    raise RuntimeError("build kvtierd first: cargo build --release -p kvtier-server")


class Daemon:
    """A kvtierd on 127.0.0.1. `config`: a TOML file passed as ``--config``.
    With an ``[s3]`` table it starts kvtierd's S3 listener too, whose
    address kvtierd prints before its gRPC one; it is kept as
    ``s3_endpoint`` (None when kvtierd printed none)."""

    def __init__(self, data_dir, env=None, config=None):
        os.makedirs(data_dir, exist_ok=True)
        e = dict(os.environ)
        e.update(
            {
                "KVTIER_LISTEN": "127.0.0.1:0",
                "KVTIER_METRICS_LISTEN": "",
                "KVTIER_DATA_DIR": str(data_dir),
                "KVTIER_DISK_CAPACITY_BYTES": str(256 << 20),
                "KVTIER_LOG": "warn",
            }
        )
        e.update(env or {})
        argv = [str(kvtierd_binary())]
        if config is not None:
            argv += ["--config", str(config)]
        self.proc = subprocess.Popen(argv, env=e, stdout=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        self.endpoint = None
        self.s3_endpoint = None
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"kvtierd exited: {self.proc.wait()}")
            if line.startswith("kvtierd s3 listening on "):
                self.s3_endpoint = "http://" + line.split()[-1]
            elif line.startswith("kvtierd listening on "):
                self.endpoint = "http://" + line.split()[-1]
                break
        if self.endpoint is None:
            self.proc.kill()
            raise RuntimeError("kvtierd did not start within 30 s")

    def freeze(self):
        """SIGSTOP, then wait until every thread is stopped: kill(2) returns
        before a thread running on another core has stopped."""
        self.proc.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + 10
        tasks = pathlib.Path(f"/proc/{self.proc.pid}/task")
        while not all(_stopped(t) for t in tasks.iterdir()):
            if time.monotonic() > deadline:
                raise RuntimeError("kvtierd did not stop within 10 s of SIGSTOP")
            time.sleep(0.005)

    def thaw(self):
        self.proc.send_signal(signal.SIGCONT)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)


def _stopped(task):
    try:
        stat = (task / "stat").read_text()
    except OSError:
        return True  # the thread exited
    # The state follows the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[0] == "T"


def lo_up():
    """Brings ``lo`` up in a fresh network namespace (``unshare --net``),
    without needing ``ip``: where a test or bench runs a component that
    binds the machine's own address (NVIDIA Dynamo's planes), so nothing
    can leave 127.0.0.1."""
    import fcntl
    import socket
    import struct

    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(s, SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh", b"lo", flags | IFF_UP))


def free_port():
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def throttling_manager_toml(blocks_dir, queue_blocks, table=""):
    """A write-through manager with an offload queue of `queue_blocks`: a
    put of more new blocks than the queue holds is refused whole as
    throttled. `table`: "manager." for kvtierd's config file, "" for an
    embedded Store."""
    return (
        (f"[{table[:-1]}]\n" if table else "")
        + 'mode = "tiered"\n'
        + 'cascade = "write-through"\n'
        + f"offload_queue_blocks = {queue_blocks}\n"
        + f"[{table}host]\n"
        + f"capacity_bytes = {64 << 20}\n"
        + "pin_memory = false\n"
        + f"[{table}disk]\n"
        + f'dir = "{blocks_dir}"\n'
        + f"capacity_bytes = {256 << 20}\n"
        + f"segment_bytes = {16 << 20}\n"
    )


def throttled_daemon(dir_, queue_blocks, env=None):
    """A real kvtierd (data and blocks under `dir_`) whose write-through
    queue holds `queue_blocks` blocks."""
    dir_ = pathlib.Path(dir_)
    cfg = dir_ / "kvtierd.toml"
    cfg.write_text(throttling_manager_toml(dir_ / "blocks", queue_blocks, table="manager."))
    return Daemon(dir_ / "data", env={"KVTIER_CONFIG": str(cfg), **(env or {})})


@pytest.fixture
def kvtierd():
    with tempfile.TemporaryDirectory() as d:
        daemon = Daemon(d)
        try:
            yield daemon
        finally:
            daemon.stop()
