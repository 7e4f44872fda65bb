"""Fixtures: kvtier's Python test kit (python/tests/kvtier_testkit.py) and a
quiet LMCache (no usage telemetry)."""

import os
import pathlib
import sys

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[3] / "python" / "tests"))

from kvtier_testkit import Daemon, kvtierd  # noqa: E402, F401
